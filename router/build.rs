//! Stamps the build with its git commit (`GIT_SHA`, shown in `/info` and
//! `tessera_build_info`). An explicit `GIT_SHA` wins, for builds outside a checkout (Docker).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=GIT_SHA");
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/refs/heads");
    if std::env::var_os("GIT_SHA").is_some() {
        return;
    }
    let sha = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok());
    if let Some(sha) = sha {
        println!("cargo:rustc-env=GIT_SHA={}", sha.trim());
    }
}
