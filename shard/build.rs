//! Link-time settings for libtorch from the project's venv (see docs/development.md).
//!
//! The rpath lets the binary find libtorch without LD_LIBRARY_PATH. When the venv holds the full
//! CUDA wheel, libtorch.so must be linked explicitly (--no-as-needed), otherwise the linker drops
//! it, libtorch_cuda.so is never loaded and CUDA is never available even on a GPU machine.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        if Path::new(&lib).join("../../nvidia/cudnn/lib").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch");
        }
    }
}
