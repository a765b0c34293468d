fn main() {
    println!("cargo:rerun-if-changed=proto/jfs.proto");
    if let Err(e) = tonic_prost_build::configure().compile_protos(&["proto/jfs.proto"], &["proto"]) {
        panic!("cannot compile proto/jfs.proto (is protoc installed? apt-get install protobuf-compiler): {e}");
    }
}
