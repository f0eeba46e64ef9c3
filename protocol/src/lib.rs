//! cohort's wire protocol (`cohort.v1`): the generated gRPC code, conversions between the
//! generated messages and domain types, and the chunked, digested transfer of parameter
//! vectors.
//!
//! This is the only crate that defines prost messages; the coordinator and participant
//! convert to domain types at their service edges with the functions here.

use sha2::{Digest, Sha256};

/// Generated messages, client and server of `cohort.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("cohort.v1");
}

/// The encoded `FileDescriptorSet` of every `cohort.v1` file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/cohort_descriptor.bin"));

/// Parameters per chunk in model downloads and update uploads (1 MiB of f32).
pub const CHUNK_PARAMS: usize = 256 * 1024;

/// Largest gRPC message either side accepts: a chunk plus headroom for its framing.
pub const MAX_MESSAGE_BYTES: usize = 4 * CHUNK_PARAMS + 64 * 1024;

/// The most labelled examples of `features` values each that one `PredictBatchRequest` can
/// carry within [`MAX_MESSAGE_BYTES`] (at least 1; a single example larger than the limit is
/// refused by the server with a clear status). Clients split larger batches with it.
pub fn examples_per_request(features: usize) -> usize {
    // An encoded Example: the packed floats (tag, length varint, 4 bytes each), the optional
    // label (tag + varint) and the repeated field's own tag and length: 4 bytes a value plus
    // at most 22 bytes of framing.
    let per_example = 4 * features + 22;
    // Leave room for the request's and gRPC's own framing.
    ((MAX_MESSAGE_BYTES - 1024) / per_example).max(1)
}

/// A malformed or inconsistent message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProtocolError {
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("update has {got} parameters, the model has {expected}")]
    ParameterCount { expected: u64, got: u64 },
    #[error("digest mismatch: sent {sent}, computed {computed}")]
    DigestMismatch { sent: String, computed: String },
    #[error("stream carries more than the {limit} bytes announced")]
    TooLarge { limit: u64 },
}

/// Bytes of the nonce every state-changing message carries (updates, shares, evaluations).
pub const NONCE_BYTES: usize = 16;

/// A message's nonce, checked for length.
pub fn nonce_of(bytes: &[u8]) -> Result<[u8; NONCE_BYTES], ProtocolError> {
    bytes.try_into().map_err(|_| {
        ProtocolError::Malformed(format!(
            "nonce must be {NONCE_BYTES} random bytes, not {}",
            bytes.len()
        ))
    })
}

/// A value that travels as fixed-width little-endian bytes: f32 parameters, or u64
/// ciphertext bodies and decryption shares.
pub trait Word: Copy + Send + 'static {
    const BYTES: usize;
    fn put(self, out: &mut Vec<u8>);
    fn get(bytes: &[u8]) -> Self;
}

impl Word for f32 {
    const BYTES: usize = 4;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        f32::from_le_bytes(b.try_into().expect("4 bytes"))
    }
}

impl Word for u64 {
    const BYTES: usize = 8;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        u64::from_le_bytes(b.try_into().expect("8 bytes"))
    }
}

/// A ciphertext body as it travels in a secure upload: 6 bytes, its top 48 bits (the
/// sender rounded its low bits away; see `cohort_crypto::glwe::round_body`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Body(pub u64);

impl Word for Body {
    const BYTES: usize = 6;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&cohort_crypto::aggregation::body_wire_bytes(self.0));
    }
    fn get(b: &[u8]) -> Self {
        Body(cohort_crypto::aggregation::body_from_wire(
            b.try_into().expect("6 bytes"),
        ))
    }
}

/// Bytes of data per chunk in every chunked transfer.
pub const CHUNK_BYTES: usize = 4 * CHUNK_PARAMS;

/// Hex SHA-256 of the little-endian bytes of `params`.
pub fn params_digest(params: &[f32]) -> String {
    let mut h = Sha256::new();
    for chunk in params.chunks(CHUNK_PARAMS) {
        h.update(f32_bytes(chunk));
    }
    hex::encode(h.finalize())
}

/// Little-endian bytes of `values`.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    word_bytes(values)
}

fn word_bytes<T: Word>(values: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * T::BYTES);
    for v in values {
        v.put(&mut out);
    }
    out
}

/// Reassembles a vector of words from chunks, checking size as it goes and the digest at
/// the end. Memory is bounded by the announced size: extra bytes are refused, not buffered.
#[derive(Debug)]
pub struct Assembler<T> {
    expected: u64,
    values: Vec<T>,
    hasher: Sha256,
}

/// Assembles f32 parameters (model downloads, plaintext updates).
pub type ParamAssembler = Assembler<f32>;
/// Assembles u64 words (decryption shares).
pub type WordAssembler = Assembler<u64>;
/// Assembles ciphertext bodies (6 bytes each).
pub type BodyAssembler = Assembler<Body>;

impl<T: Word> Assembler<T> {
    /// Expects exactly `expected` values.
    pub fn new(expected: u64) -> Self {
        Assembler {
            expected,
            values: Vec::with_capacity(expected.min(1 << 27) as usize),
            hasher: Sha256::new(),
        }
    }

    /// Appends one chunk of little-endian bytes.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
        if !bytes.len().is_multiple_of(T::BYTES) {
            return Err(ProtocolError::Malformed(format!(
                "chunk of {} bytes is not a whole number of {}-byte values",
                bytes.len(),
                T::BYTES
            )));
        }
        let after = self.values.len() as u64 + (bytes.len() / T::BYTES) as u64;
        if after > self.expected {
            return Err(ProtocolError::TooLarge {
                limit: self.expected * T::BYTES as u64,
            });
        }
        self.hasher.update(bytes);
        self.values.extend(bytes.chunks_exact(T::BYTES).map(T::get));
        Ok(())
    }

    /// Values received so far.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Checks the count and the sender's digest; returns the values and the digest bytes.
    pub fn finish_with_digest(
        self,
        sent_digest: &str,
    ) -> Result<(Vec<T>, [u8; 32]), ProtocolError> {
        if self.values.len() as u64 != self.expected {
            return Err(ProtocolError::ParameterCount {
                expected: self.expected,
                got: self.values.len() as u64,
            });
        }
        let digest: [u8; 32] = self.hasher.finalize().into();
        let computed = hex::encode(digest);
        if !computed.eq_ignore_ascii_case(sent_digest) {
            return Err(ProtocolError::DigestMismatch {
                sent: sent_digest.to_string(),
                computed,
            });
        }
        Ok((self.values, digest))
    }

    /// Checks the count and the sender's digest; returns the values.
    pub fn finish(self, sent_digest: &str) -> Result<Vec<T>, ProtocolError> {
        self.finish_with_digest(sent_digest).map(|(v, _)| v)
    }
}

/// `values` as little-endian byte chunks of [`CHUNK_BYTES`] (at least one chunk, so an
/// empty vector still travels), with the digest of all of them, in one pass.
pub fn encode<T: Word>(values: &[T]) -> (Vec<Vec<u8>>, String) {
    let mut h = Sha256::new();
    let mut chunks: Vec<Vec<u8>> = values
        .chunks(CHUNK_BYTES / T::BYTES)
        .map(|c| {
            let bytes = word_bytes(c);
            h.update(&bytes);
            bytes
        })
        .collect();
    if chunks.is_empty() {
        chunks.push(Vec::new());
    }
    (chunks, hex::encode(h.finalize()))
}

/// The chunks of a model download; the last one carries the digest. Encode once per model
/// version and serve the result to every participant.
pub fn model_chunks(params: &[f32]) -> Vec<pb::ModelChunk> {
    let (chunks, digest) = encode(params);
    let last = chunks.len() - 1;
    chunks
        .into_iter()
        .enumerate()
        .map(|(k, data)| pb::ModelChunk {
            offset: (k * CHUNK_PARAMS) as u64,
            data,
            total_parameters: params.len() as u64,
            digest: if k == last {
                digest.clone()
            } else {
                String::new()
            },
        })
        .collect()
}

/// The chunks of an update upload: header, data (f32 parameters in plaintext rounds,
/// u64 ciphertext bodies in secure ones), trailer with the digest.
pub fn update_chunks<T: Word>(header: pb::UpdateHeader, values: &[T]) -> Vec<pb::UpdateChunk> {
    use pb::update_chunk::Part;
    let (chunks, digest) = encode(values);
    std::iter::once(Part::Header(header))
        .chain(chunks.into_iter().map(Part::Data))
        .chain(std::iter::once(Part::Trailer(pb::UpdateTrailer { digest })))
        .map(|part| pb::UpdateChunk { part: Some(part) })
        .collect()
}

/// The chunks of a decryption share: header, data, trailer with the digest.
pub fn share_chunks(header: pb::ShareHeader, share: &[u64]) -> Vec<pb::ShareChunk> {
    use pb::share_chunk::Part;
    let (chunks, digest) = encode(share);
    std::iter::once(Part::Header(header))
        .chain(chunks.into_iter().map(Part::Data))
        .chain(std::iter::once(Part::Trailer(pb::UpdateTrailer { digest })))
        .map(|part| pb::ShareChunk { part: Some(part) })
        .collect()
}

pub mod secure;
#[cfg(feature = "server")]
pub mod server;
pub mod tls;

#[cfg(feature = "model")]
mod convert;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_predict_batch_fits_the_message_limit() {
        use prost::Message;
        for features in [1, 30, 784, 3 * 32 * 32, 300_000] {
            let n = examples_per_request(features);
            let req = pb::PredictBatchRequest {
                examples: (0..n)
                    .map(|i| pb::Example {
                        features: vec![1.5; features],
                        label: Some(u32::MAX - i as u32),
                        raw: Default::default(),
                    })
                    .collect(),
            };
            let len = req.encoded_len();
            if n > 1 {
                assert!(len <= MAX_MESSAGE_BYTES, "{features} features: {len} bytes");
                // Not needlessly small either, where framing is a small part of an example.
                if features >= 784 {
                    assert!(
                        len > MAX_MESSAGE_BYTES * 9 / 10,
                        "{features}: only {len} bytes"
                    );
                }
            }
        }
        assert_eq!(examples_per_request(300_000), 1);
    }

    #[test]
    fn chunks_reassemble_with_digest() {
        let params: Vec<f32> = (0..(CHUNK_PARAMS * 2 + 5))
            .map(|i| i as f32 * 0.5)
            .collect();
        let chunks = model_chunks(&params);
        assert_eq!(chunks.len(), 3);
        let mut a = ParamAssembler::new(params.len() as u64);
        for c in &chunks {
            a.push(&c.data).unwrap();
        }
        assert_eq!(a.finish(&chunks[2].digest).unwrap(), params);
    }

    #[test]
    fn assembler_refuses_bad_input() {
        let params = vec![1.0f32, 2.0, 3.0];
        let d = params_digest(&params);
        let mut a = ParamAssembler::new(3);
        a.push(&f32_bytes(&params)).unwrap();
        assert!(matches!(
            a.finish(&params_digest(&[1.0, 2.0, 4.0])),
            Err(ProtocolError::DigestMismatch { .. })
        ));
        let mut a = ParamAssembler::new(2);
        assert_eq!(
            a.push(&f32_bytes(&params)),
            Err(ProtocolError::TooLarge { limit: 8 })
        );
        let mut a = ParamAssembler::new(4);
        a.push(&f32_bytes(&params)).unwrap();
        assert_eq!(
            a.finish(&d),
            Err(ProtocolError::ParameterCount {
                expected: 4,
                got: 3
            })
        );
        assert!(matches!(
            ParamAssembler::new(4).push(&[0u8; 5]),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn empty_vector_is_one_chunk() {
        let c = model_chunks(&[]);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].digest, params_digest(&[]));
    }

    #[cfg(feature = "model")]
    #[test]
    fn specs_and_configs_round_trip() {
        use cohort_model::{Metrics, ModelSpec, Optimizer, TrainConfig};
        for spec in [
            ModelSpec::Logistic {
                inputs: 3,
                classes: 2,
            },
            ModelSpec::Mlp {
                inputs: 3,
                hidden: vec![4, 5],
                classes: 2,
            },
            ModelSpec::Cnn {
                channels: 1,
                height: 28,
                width: 28,
                classes: 10,
            },
        ] {
            assert_eq!(
                ModelSpec::try_from(&pb::ModelSpec::from(&spec)).unwrap(),
                spec
            );
        }
        let bad = pb::ModelSpec {
            kind: "rnn".into(),
            ..Default::default()
        };
        assert!(
            ModelSpec::try_from(&bad)
                .unwrap_err()
                .to_string()
                .contains("rnn")
        );
        let cfg = TrainConfig {
            epochs: 2,
            batch_size: 16,
            learning_rate: 0.1,
            optimizer: Optimizer::Adam,
            seed: 5,
            proximal_mu: 0.0,
            momentum: 0.0,
            weight_decay: 0.0,
        };
        assert_eq!(
            TrainConfig::try_from(&pb::TrainConfig::from(&cfg)).unwrap(),
            cfg
        );
        let m = Metrics {
            loss: 0.5,
            accuracy: 0.9,
            auc: None,
            num_examples: 10,
        };
        assert_eq!(Metrics::try_from(&pb::Metrics::from(&m)).unwrap(), m);
    }
}
