fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(&["proto/basalt/v1/cluster.proto"], &["proto"])?;
    Ok(())
}
