//! Build-time inputs of the router:
//! - the git commit (`GIT_SHA`, shown in `/info` and `tessera_build_info`); an explicit
//!   `GIT_SHA` wins, for builds outside a checkout (Docker);
//! - the web UI (`router/ui`, built with Vite into `OUT_DIR/ui` and embedded by
//!   `server/ui.rs`). `TESSERA_UI_DIST` points at an already built copy instead (the Docker
//!   build makes it in a Node stage). Without Node.js the router still builds, with a page that
//!   says how to get the UI.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    git_sha();
    ui();
}

fn git_sha() {
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

const FALLBACK: &str =
    "<!doctype html><title>Tessera</title><p>This build of Tessera has no web UI: \
Node.js 20 and npm were not found when it was compiled. Install them and rebuild \
(<code>cargo build --release</code>), or use the API directly.</p>";

fn ui() {
    let src = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("ui");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    println!("cargo:rerun-if-env-changed=TESSERA_UI_DIST");
    for input in [
        "index.html",
        "src",
        "package.json",
        "package-lock.json",
        "vite.config.js",
    ] {
        println!("cargo:rerun-if-changed=ui/{input}");
    }
    let dist = match std::env::var_os("TESSERA_UI_DIST") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let dist = out.join("ui");
            if let Err(e) = vite_build(&src, &dist) {
                println!("cargo:warning=web UI not built ({e}); /ui will say so");
                let _ = std::fs::remove_dir_all(&dist);
                std::fs::create_dir_all(&dist).expect("OUT_DIR is writable");
                std::fs::write(dist.join("index.html"), FALLBACK).expect("OUT_DIR is writable");
            }
            dist
        }
    };
    let mut files = Vec::new();
    collect(&dist, &dist, &mut files);
    // Sorted for a reproducible build, with index.html first.
    files.sort();
    files.sort_by_key(|name| name.as_str() != "index.html");
    let mut code = String::from("pub static ASSETS: &[(&str, &[u8])] = &[\n");
    for name in &files {
        let path = dist.join(name);
        code += &format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        );
    }
    code += "];\n";
    std::fs::write(out.join("ui_assets.rs"), code).expect("OUT_DIR is writable");
}

fn vite_build(src: &Path, dist: &Path) -> Result<(), String> {
    let npm_ok = Command::new("npm")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !npm_ok {
        return Err("npm not found".into());
    }
    let installed = src.join("node_modules/.package-lock.json");
    let stale = match (
        installed.metadata(),
        src.join("package-lock.json").metadata(),
    ) {
        (Ok(i), Ok(l)) => i.modified().ok() < l.modified().ok(),
        _ => true,
    };
    if stale {
        run(Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(src))?;
    }
    run(Command::new("node")
        .arg("node_modules/vite/bin/vite.js")
        .args(["build", "--base", "/ui/", "--emptyOutDir", "--outDir"])
        .arg(dist)
        .current_dir(src))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn collect(root: &Path, dir: &Path, files: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(root, &path, files);
        } else if let Ok(rel) = path.strip_prefix(root) {
            files.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}
