//! The protobuf codec every generated service and client uses: prost's, except that
//! - a body that does not decode is the caller's fault (INVALID_ARGUMENT, the gRPC convention
//!   for a malformed request), not the server's (prost's codec answers INTERNAL);
//! - each call's buffers start at [`BUFFER_BYTES`] instead of 8 KiB and grow as messages need:
//!   most messages are a few hundred bytes, and a server holding ten thousand watch streams
//!   held two such buffers for each.

use prost::Message;
use tonic::{
    Code, Status,
    codec::{BufferSettings, DecodeBuf},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::limits::MAX_MESSAGE_NESTING;

/// The bytes a call's encode and decode buffers start with.
pub const BUFFER_BYTES: usize = 1024;
/// How much an encoded stream buffers before it yields to the transport (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

fn buffer_settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
}

/// [`ProstCodec`] with decode failures answered as INVALID_ARGUMENT, and small buffers.
#[derive(Debug, Clone, Default)]
pub struct Codec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(ProstCodec::<T, U>::raw_decoder(buffer_settings()))
    }
}

/// Decodes with prost, naming what was wrong with a body that does not decode.
#[derive(Debug)]
pub struct Decoder<U>(ProstDecoder<U>);

impl<U: Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            if status.code() != Code::Internal {
                return status;
            }
            let detail = status.message();
            let hint = if detail.contains("recursion limit") {
                format!(
                    "; messages may nest at most {MAX_MESSAGE_NESTING} levels deep (a \
                     google.protobuf.Struct takes three levels for each of its own)"
                )
            } else {
                String::new()
            };
            Status::invalid_argument(format!(
                "the message is not valid protobuf for this method: {detail}{hint}"
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
