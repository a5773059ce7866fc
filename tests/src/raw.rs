//! gRPC calls with bodies given as bytes: what a client written from the .proto files alone, or
//! a fuzzer, can send, including bodies no generated client would produce.

use bytes::{Buf, BufMut};
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

/// Sends and receives message bodies as they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut body = vec![0; src.remaining()];
        src.copy_to_slice(&mut body);
        Ok(Some(body))
    }
}

/// A client of any method, by its path (`/jobwire.v1.JobService/GetJob`).
#[derive(Debug, Clone)]
pub struct RawClient {
    grpc: tonic::client::Grpc<Channel>,
}

impl RawClient {
    pub fn new(channel: Channel) -> Self {
        Self {
            grpc: tonic::client::Grpc::new(channel)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        }
    }

    fn path(method: &str) -> Result<http::uri::PathAndQuery, Status> {
        method
            .parse()
            .map_err(|_| Status::invalid_argument(format!("bad method path {method:?}")))
    }

    /// A unary call: the response body, or the status.
    pub async fn unary(
        &mut self,
        method: &str,
        body: Vec<u8>,
        metadata: &[(&'static str, String)],
    ) -> Result<Vec<u8>, Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut request = tonic::Request::new(body);
        add_metadata(&mut request, metadata)?;
        let path = Self::path(method)?;
        Ok(self.grpc.unary(request, path, RawCodec).await?.into_inner())
    }

    /// A server-streaming call: its responses until it ends, at most `most` of them.
    pub async fn server_streaming(
        &mut self,
        method: &str,
        body: Vec<u8>,
        metadata: &[(&'static str, String)],
        most: usize,
    ) -> Result<Vec<Vec<u8>>, Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut request = tonic::Request::new(body);
        add_metadata(&mut request, metadata)?;
        let path = Self::path(method)?;
        let mut stream = self
            .grpc
            .server_streaming(request, path, RawCodec)
            .await?
            .into_inner();
        let mut out = Vec::new();
        while out.len() < most {
            match stream.message().await? {
                Some(body) => out.push(body),
                None => break,
            }
        }
        Ok(out)
    }

    /// A bidirectional call fed `bodies`: the responses that come within `wait` of the last one.
    pub async fn streaming(
        &mut self,
        method: &str,
        bodies: Vec<Vec<u8>>,
        metadata: &[(&'static str, String)],
        wait: std::time::Duration,
    ) -> Result<Vec<Vec<u8>>, Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let (tx, rx) = tokio::sync::mpsc::channel(bodies.len().max(1));
        for body in bodies {
            let _ = tx.send(body).await;
        }
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        add_metadata(&mut request, metadata)?;
        let path = Self::path(method)?;
        let mut stream = self
            .grpc
            .streaming(request, path, RawCodec)
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Ok(next) = tokio::time::timeout(wait, stream.message()).await {
            match next? {
                Some(body) => out.push(body),
                None => break,
            }
        }
        drop(tx);
        Ok(out)
    }
}

fn add_metadata<T>(
    request: &mut tonic::Request<T>,
    metadata: &[(&'static str, String)],
) -> Result<(), Status> {
    for (key, value) in metadata {
        let value = value
            .parse()
            .map_err(|_| Status::invalid_argument(format!("bad metadata value for {key}")))?;
        request.metadata_mut().insert(*key, value);
    }
    Ok(())
}
