//! Embeds the git commit of the build as GIT_SHA (reported by `/info`), when built from a checkout.
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/refs/heads");
    println!("cargo:rerun-if-env-changed=GIT_SHA");
    if std::env::var("GIT_SHA").is_ok() {
        return;
    }
    let sha = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success());
    if let Some(out) = sha {
        let sha = String::from_utf8_lossy(&out.stdout).trim().to_string();
        println!("cargo:rustc-env=GIT_SHA={sha}");
    }
}
