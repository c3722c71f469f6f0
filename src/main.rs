//! The `runonce` command line: parses, then hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use runonce::config::{self, Flags, LogFormat, Settings};
use runonce::sim::mock::{self, Fault, FaultKind, MockOptions, Mode};
use runonce::{demo, health, server, telemetry};

/// An idempotency proxy for PowerJob: one runJob reaches the server once, however often the client sends it.
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start-up
enum Command {
    /// Run the proxy (the default).
    Serve(ServeArgs),
    /// Run a PowerJob-compatible mock server that counts the instances it creates.
    MockPowerjob(MockArgs),
    /// Show the 5.1.0 client's double runJob, directly against a mock and through runonce.
    Demo,
    /// Validate a config file (with RUNONCE_* overrides) and print the effective settings.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// GET an admin endpoint and exit 0 on a 2xx answer, 1 otherwise: the image's health check (no curl in it).
    Health {
        /// What to GET: the admin /healthz (alive) or /readyz (an upstream reachable).
        #[arg(long, default_value = health::DEFAULT_URL)]
        url: String,
        /// Longest the whole check may take (e.g. 2s).
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// Config file (TOML); see config/runonce.toml. Also RUNONCE_CONFIG.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: Flags,
}

#[derive(clap::Args)]
struct MockArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: std::net::SocketAddr,
    /// Server behaviour: v5.1.0-auth-off, v5.1.1-auth-off, auth-on or v4.
    #[arg(long, default_value = "v5.1.0-auth-off")]
    mode: Mode,
    /// Delay added to runJob/runWorkflow answers, after the instance is created (milliseconds).
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Delay added to queryInstance answers (milliseconds): a slow lookup.
    #[arg(long, default_value_t = 0)]
    query_latency_ms: u64,
    /// How many queryInstance calls, the first ones, fail with HTTP 500.
    #[arg(long, default_value_t = 0)]
    query_failures: u64,
    /// The one app this server knows.
    #[arg(long, default_value = "my-app")]
    app_name: String,
    /// That app's password.
    #[arg(long, default_value = "123456")]
    password: String,
    /// That app's id.
    #[arg(long, default_value_t = 1)]
    app_id: i64,
    /// Fault for runJob/runWorkflow: timeout-after-create, error-after-create, 5xx-after-create,
    /// 502-after-create, 504-after-create, stall-after-create, close-without-create (or none). POST /mock/fault
    /// changes it at run time.
    #[arg(long, default_value = "none")]
    fault: FaultKind,
    /// How many creating calls get --fault (default: every one).
    #[arg(long, value_name = "N", requires = "fault")]
    fault_count: Option<u64>,
    /// Replaces the success:false message of timeout-after-create and error-after-create.
    #[arg(long, value_name = "TEXT", requires = "fault")]
    fault_message: Option<String>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return match err.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(config::EXIT_CONFIG as u8),
            };
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("runonce: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            None => serve(cli.serve).await,
            Some(Command::Serve(args)) => serve(args).await,
            Some(Command::MockPowerjob(args)) => mock_powerjob(args).await,
            Some(Command::Demo) => {
                // The demo prints its own account; logs only for errors unless asked for.
                telemetry::init(LogFormat::Text, "error");
                match demo::run().await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(err) => {
                        eprintln!("runonce demo: {err}");
                        ExitCode::FAILURE
                    }
                }
            }
            Some(Command::CheckConfig { file }) => check_config(&file),
            Some(Command::Health { url, timeout }) => match health::check(&url, timeout).await {
                Ok((status, body)) => {
                    println!("healthy: {status} {body}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("runonce health: {err}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}

fn load(file: Option<&std::path::Path>, flags: &Flags) -> Result<Settings, ExitCode> {
    Settings::load(file, |key| std::env::var(key).ok(), flags).map_err(|err| {
        eprintln!("runonce: {err}");
        ExitCode::from(config::EXIT_CONFIG as u8)
    })
}

async fn serve(args: ServeArgs) -> ExitCode {
    let file = args
        .config
        .or_else(|| std::env::var_os("RUNONCE_CONFIG").map(PathBuf::from));
    let settings = match load(file.as_deref(), &args.flags) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    telemetry::init(settings.log_format, "info");
    for name in unknown_env() {
        tracing::warn!(variable = %name, "not a runonce setting; ignored");
    }
    // Opening the store connects to nothing yet (Redis may come up later): only the URL can be wrong.
    let store = match runonce::store::open(&settings).await {
        Ok(store) => store,
        Err(err) => {
            eprintln!(
                "runonce: invalid setting store = {:?}: {err}",
                settings.store.redacted()
            );
            return ExitCode::from(config::EXIT_CONFIG as u8);
        }
    };
    let listeners = match server::Listeners::bind(&settings).await {
        Ok(listeners) => listeners,
        Err(err) => {
            eprintln!("runonce: cannot bind: {err}");
            return ExitCode::FAILURE;
        }
    };
    let (proxy, admin) = (listeners.proxy.local_addr(), listeners.admin.local_addr());
    if let (Ok(proxy), Ok(admin)) = (proxy, admin) {
        // The one line on stdout: tests and scripts that bind port 0 read the ports from it.
        println!("listening proxy={proxy} admin={admin}");
        tracing::info!(%proxy, %admin, upstreams = ?settings.upstreams.iter().map(ToString::to_string).collect::<Vec<_>>(), store = %settings.store.redacted(), "runonce serving");
    }
    let source = runonce::reload::Source {
        file,
        flags: args.flags,
    };
    let shutdown = server::shutdown_signal();
    match server::run(settings, listeners, store, shutdown, Some(source)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("runonce: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn mock_powerjob(args: MockArgs) -> ExitCode {
    telemetry::init(LogFormat::Text, "info");
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("runonce mock-powerjob: cannot bind {}: {err}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    if let Ok(addr) = listener.local_addr() {
        println!("listening mock={addr} mode={}", args.mode.as_str());
    }
    let options = MockOptions {
        mode: args.mode,
        latency: Duration::from_millis(args.latency_ms),
        query_latency: Duration::from_millis(args.query_latency_ms),
        query_failures: args.query_failures,
        app_name: args.app_name,
        password: args.password,
        app_id: args.app_id,
        fault: Fault {
            kind: args.fault,
            remaining: args.fault_count,
            message: args.fault_message,
        },
    };
    match mock::run(listener, options, server::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("runonce mock-powerjob: {err}");
            ExitCode::FAILURE
        }
    }
}

fn unknown_env() -> Vec<String> {
    config::unknown_env_vars(std::env::vars_os().filter_map(|(name, _)| name.into_string().ok()))
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match load(Some(file), &Flags::default()) {
        Ok(settings) => {
            for name in unknown_env() {
                eprintln!("runonce: warning: {name} is not a runonce setting; ignored");
            }
            print!("{}", settings.to_toml());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}
