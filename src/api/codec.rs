//! The codec the vault's services decode their requests with.
//!
//! It is prost's own codec but for one answer. A request body that is not
//! the method's protobuf message is bad input from the caller, and the
//! error model promises bad input INVALID_ARGUMENT with a credvault
//! ErrorInfo; prost's codec answers it with a bare INTERNAL, gRPC's code for
//! a server that cannot parse, which this vault keeps for its own bugs.
//! Deciding it here, where prost's error is still a value, means no answer
//! is recognised afterwards by its text.
//!
//! `build.rs` generates the services with this codec and the clients with
//! prost's: a client that cannot decode the vault's answer is looking at
//! the vault's fault, and INTERNAL is the right word for it there.
//!
//! A request over `server.max_request_bytes` never reaches a decoder: tonic
//! refuses it from its length prefix, and the admission layer types that
//! answer.
//!
//! Answers are encoded as prost encodes them, into a buffer on the stack
//! that is then handed to tonic in one copy: see [`ResponseEncoder`].

use std::marker::PhantomData;

use bytes::BufMut;
use prost::Message;
use tonic::{
    codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    Status,
};

use super::{status::FieldViolation, ApiError};

/// prost's codec, with typed refusals of undecodable requests.
pub struct RequestCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for RequestCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for RequestCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ResponseEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ResponseEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(PhantomData)
    }
}

/// Decodes one request message; see [`RequestCodec`].
pub struct RequestDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(refusal)
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// The longest answer encoded on the stack. A cache hit's answer (a
/// token, its type, expiry and scopes) is well under it; a longer one, such
/// as a page of a listing, is encoded straight into tonic's buffer.
const STACK_ANSWER: usize = 1024;

/// Encodes one answer: prost's encoding, written in one copy.
///
/// prost writes a message a byte at a time for every tag, length and
/// integer, and each of those bytes was a `put_slice` into tonic's buffer,
/// its capacity checked and the byte copied by a call to `memcpy`. Into a
/// slice on the stack the same byte is a store, and tonic's buffer takes
/// the whole answer at once (callgrind, 2026-12-04: see BENCHMARKS.md).
/// The bytes on the wire are prost's, byte for byte.
pub struct ResponseEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for ResponseEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        encode_answer(&item, buf);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Appends `item`'s encoding to `buf` (which grows as needed, as tonic's
/// does).
fn encode_answer(item: &impl Message, buf: &mut impl BufMut) {
    let len = item.encoded_len();
    if len <= STACK_ANSWER {
        let mut stack = [0u8; STACK_ANSWER];
        let mut unwritten = &mut stack[..len];
        // `encoded_len` is exactly what `encode_raw` writes, so the slice
        // has room for all of it.
        item.encode_raw(&mut unwritten);
        buf.put_slice(&stack[..len]);
    } else {
        item.encode_raw(buf);
    }
}

/// prost's error names the message, the field and what was wrong with the
/// bytes, never the bytes themselves; it is cut short all the same, since
/// its path of nested fields is as long as the caller made it.
fn refusal(error: prost::DecodeError) -> Status {
    let error = error.to_string();
    // prost opens with the words this status already says.
    let why = error
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(&error);
    let why: String = why.chars().take(200).collect();
    ApiError::InvalidFields(vec![FieldViolation::new(
        "request",
        format!("not a valid protobuf message of this method's request type: {why}"),
    )])
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::pb::GetAccessTokenRequest;

    /// An answer on either side of the stack's limit is prost's encoding,
    /// byte for byte, with nothing written after it.
    #[test]
    fn answers_are_encoded_exactly_as_prost_encodes_them() {
        use crate::api::pb::GetAccessTokenResponse;
        for token_len in [0, 1, 100, STACK_ANSWER - 40, STACK_ANSWER, 5000] {
            let answer = GetAccessTokenResponse {
                access_token: "t".repeat(token_len),
                token_type: "Bearer".into(),
                expires_at: Some(prost_types::Timestamp {
                    seconds: 1_799_999_999,
                    nanos: 123_456_789,
                }),
                scopes: vec!["read".into(), "write".into()],
            };
            let expected = answer.encode_to_vec();
            let mut buf = bytes::BytesMut::from(&b"before"[..]);
            encode_answer(&answer, &mut buf);
            assert_eq!(&buf[..6], b"before");
            assert_eq!(&buf[6..], &expected[..], "token of {token_len} bytes");
        }
    }

    #[test]
    fn undecodable_bytes_are_refused_as_the_callers_error() {
        // A string field holding bytes that are not UTF-8.
        let bytes: &[u8] = b"\x0a\x05\x0a\x03\xff\xfe\xfd";
        let error = GetAccessTokenRequest::decode(bytes).unwrap_err();
        let status = refusal(error);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let details = tonic_types::StatusExt::get_error_details(&status);
        assert_eq!(
            details.error_info().map(|i| i.reason.as_str()),
            Some("INVALID_FIELD")
        );
        let violation = &details.bad_request().unwrap().field_violations[0];
        assert_eq!(violation.field, "request");
        // It says where and what, once, and nothing of the bytes.
        assert_eq!(
            violation.description,
            "not a valid protobuf message of this method's request type: \
             CredentialRef.tenant: GetAccessTokenRequest.credential: \
             invalid string value: data is not UTF-8 encoded"
        );
    }
}
