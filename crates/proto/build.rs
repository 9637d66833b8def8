//! Generates the gRPC code from `proto/` with the protoc binary vendored in a crate, so a fresh
//! machine needs no system protoc.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let protos = [
        root.join("ledger/v1/ledger.proto"),
        root.join("ledger/internal/v1/internal.proto"),
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("ledger_descriptor.bin"))
        .compile_with_config(config, &protos, &[root])?;
    Ok(())
}
