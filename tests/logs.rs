//! Log output as a deployment sees it: stderr redirected to a file or a collector, not a terminal.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

#[test]
fn logs_to_a_file_carry_no_colour_codes() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_runonce"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            "http://127.0.0.1:9",
        ])
        .env("RUNONCE_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn runonce");
    // Each stream on a thread of its own, so a process that never writes cannot hang the test.
    let lines = |stream: Box<dyn Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        rx
    };
    let stdout = lines(Box::new(child.stdout.take().expect("stdout")));
    let stderr = lines(Box::new(child.stderr.take().expect("stderr")));
    let line = stdout.recv_timeout(support::STEP).unwrap_or_default();
    assert!(line.starts_with("listening "), "did not start: {line:?}");
    // The start-up line is logged just after `listening …` is printed.
    let mut logged = Vec::new();
    while let Ok(line) = stderr.recv_timeout(support::STEP) {
        let done = line.contains("runonce serving");
        logged.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        logged.iter().any(|l| l.contains("runonce serving")),
        "{logged:?}"
    );
    assert!(
        !logged.iter().any(|l| l.contains('\u{1b}')),
        "colour codes in {logged:?}"
    );
}
