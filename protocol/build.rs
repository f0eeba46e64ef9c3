//! Compiles `proto/` with protox (pure Rust), so a fresh machine needs no system `protoc`.
//! The encoded descriptor set is kept for gRPC server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/cohort/v1/federation.proto",
        "proto/cohort/v1/admin.proto",
        "proto/cohort/v1/inference.proto",
        "proto/cohort/v1/simulation.proto",
    ];
    let fds = protox::compile(protos, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("cohort_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
