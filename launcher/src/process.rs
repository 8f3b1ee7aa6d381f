//! Child processes under supervision: spawn with output relayed, wait for readiness, notice
//! death, and stop gracefully (SIGTERM, then SIGKILL after a timeout).
//!
//! Each child's stderr is relayed line by line and its tail is kept, so when a child dies the
//! launcher can say why in one line instead of pointing at a scrollback.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const TAIL_LINES: usize = 20;

pub struct Supervised {
    pub name: String,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
}

/// How a child's output line is shown: prefixed with the child's name, or, with
/// `--json-output`, as a JSON object with a `source` field (non-JSON lines are wrapped).
fn format_line(name: &str, line: &str, json: bool) -> String {
    if !json {
        return format!("{name} | {line}");
    }
    match serde_json::from_str::<serde_json::Value>(line) {
        Ok(serde_json::Value::Object(mut obj)) => {
            obj.insert("source".into(), name.into());
            serde_json::Value::Object(obj).to_string()
        }
        _ => serde_json::json!({"source": name, "message": line}).to_string(),
    }
}

fn relay(
    name: String,
    json: bool,
    stream: impl Read + Send + 'static,
    tail: Arc<Mutex<VecDeque<String>>>,
    to_stderr: bool,
) {
    thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let shown = format_line(&name, &line, json);
            if to_stderr {
                let _ = writeln!(std::io::stderr(), "{shown}");
            } else {
                let _ = writeln!(std::io::stdout(), "{shown}");
            }
            let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
            if t.len() == TAIL_LINES {
                t.pop_front();
            }
            t.push_back(line);
        }
    });
}

impl Supervised {
    pub fn spawn(name: &str, mut cmd: Command, json_logs: bool) -> anyhow::Result<Self> {
        // Own process group: a Ctrl-C in the terminal reaches only the launcher, which then
        // stops the children in order.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let program = cmd.get_program().to_string_lossy().into_owned();
        let mut child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {name} ({program}): {e}"))?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(out) = child.stdout.take() {
            relay(name.to_string(), json_logs, out, tail.clone(), false);
        }
        if let Some(err) = child.stderr.take() {
            relay(name.to_string(), json_logs, err, tail.clone(), true);
        }
        Ok(Self {
            name: name.to_string(),
            child,
            tail,
        })
    }

    /// `Some(status)` once the child has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The most telling line of the child's last output: its last error line, else its last line.
    pub fn last_words(&self) -> String {
        // Give the relay threads a moment to drain what the child wrote before dying.
        thread::sleep(Duration::from_millis(200));
        let t = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        t.iter()
            .rev()
            .find(|l| l.contains("Error") || l.contains("error") || l.contains("panicked"))
            .or_else(|| t.back())
            .cloned()
            .unwrap_or_else(|| "no output".into())
    }

    /// SIGKILL at once: for a child that no longer answers (SIGKILL also ends a stopped one).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        tracing::info!("Waiting for {} to gracefully shutdown", self.name);
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                tracing::info!("{} terminated", self.name);
                return Some(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        tracing::warn!("Killing {}", self.name);
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

/// Describes an exit status for humans: "exit code 1" or "signal 9 (SIGKILL)".
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("signal {sig} ({s})"),
            Err(_) => format!("signal {sig}"),
        },
        _ => "unknown status".into(),
    }
}
