//! Log output as a deployment sees it: stderr redirected to a file or a collector, not a terminal.

mod support;

use std::io::Read;
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
    // The `listening …` line comes after the start-up log line; then stop and read what was logged.
    let mut stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = [0u8; 256];
        let n = stdout.read(&mut line).unwrap_or(0);
        let _ = tx.send(String::from_utf8_lossy(&line[..n]).into_owned());
    });
    let line = rx.recv_timeout(support::STEP).unwrap_or_default();
    assert!(line.starts_with("listening "), "did not start: {line:?}");
    let _ = child.kill();
    let mut logged = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut logged)
        .expect("read stderr");
    let _ = child.wait();
    assert!(logged.contains("runonce serving"), "{logged:?}");
    assert!(!logged.contains('\u{1b}'), "colour codes in {logged:?}");
}
