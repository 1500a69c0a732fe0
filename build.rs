//! Generates protobuf code with protox, so a fresh machine needs no `protoc`: the testkit's
//! protos (feature `testkit`) and the vendored etcd v3 protos (feature `etcd`, client only).

fn main() {
    println!("cargo:rerun-if-changed=proto");
    #[cfg(feature = "testkit")]
    if let Err(err) = testkit_codegen() {
        eprintln!("towline build: generating testkit protobuf code failed: {err}");
        std::process::exit(1);
    }
    #[cfg(feature = "etcd")]
    if let Err(err) = etcd_codegen() {
        eprintln!("towline build: generating etcd protobuf code failed: {err}");
        std::process::exit(1);
    }
}

#[cfg(feature = "testkit")]
fn testkit_codegen() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(
        [
            "towline/testkit/v1/echo.proto",
            "towline/testkit/v1/produce.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        // Produce records decode as slices of the received buffer, not one allocation each.
        .bytes(".towline.testkit.v1.ProduceRequest.records")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

#[cfg(feature = "etcd")]
fn etcd_codegen() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["etcd/etcdserverpb/rpc.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
