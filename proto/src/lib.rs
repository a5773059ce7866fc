//! Generated Rust types and gRPC stubs for the `jobwire.v1` protocol.
//!
//! The `.proto` files in `proto/jobwire/v1/` are the contract between the server, the SDK and
//! any other language's workers; this crate only compiles them (with protox, so no system
//! `protoc` is needed) and re-exports the result.

pub mod codec;
pub mod limits;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("jobwire.v1");
}

/// The encoded `FileDescriptorSet` of every jobwire file and its imports, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("jobwire_descriptor");

pub use prost_types;
