//! Generates the gRPC client and server from `generate.proto` with a protoc that comes from
//! crates.io (protoc-bin-vendored), so builds never depend on a system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded, so setting the env var is race-free.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=generate.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["generate.proto"], &["."])?;
    Ok(())
}
