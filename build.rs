//! Generates the gRPC code from proto/ with protox (no system protoc needed).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        [
            "trellis/discovery/v1/discovery.proto",
            "trellis/identity/v1/identity.proto",
            "trellis/cluster/v1/cluster.proto",
            "grpc/health/v1/health.proto",
            "trellis/echo/v1/echo.proto",
            "opentelemetry/proto/collector/trace/v1/trace_service.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
