fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // For tonic-reflection, so grpcurl can list and call services.
        .file_descriptor_set_path(out.join("basalt_descriptor.bin"))
        .compile_protos(
            &["proto/basalt/v1/cluster.proto", "proto/basalt/v1/agent.proto", "proto/basalt/raft/v1/raft.proto"],
            &["proto"],
        )?;
    Ok(())
}
