//! Conversions between the secure-aggregation messages and `cohort_crypto`'s types. Every
//! conversion from the wire checks lengths and names the field that is wrong.

use cohort_crypto::aggregation::{
    KeyBinding, MemberInfo, PublicKeys, RoundInfo, SCHEME, SealedPiece, UploadRecord,
};
use cohort_crypto::{Codec, GlweParams, MemberPublic, RoundSeed, Sealed, VerifyKey};

use crate::{ProtocolError, pb};

fn fixed<const N: usize>(bytes: &[u8], what: &str) -> Result<[u8; N], ProtocolError> {
    bytes.try_into().map_err(|_| {
        ProtocolError::Malformed(format!("{what} must be {N} bytes, not {}", bytes.len()))
    })
}

/// A 32-byte key or digest field.
pub fn bytes32(bytes: &[u8], what: &str) -> Result<[u8; 32], ProtocolError> {
    fixed(bytes, what)
}

/// A 64-byte signature field.
pub fn bytes64(bytes: &[u8], what: &str) -> Result<[u8; 64], ProtocolError> {
    fixed(bytes, what)
}

/// A key binding from its wire fields (both empty: none).
pub fn binding_from(certificate: &[u8], signature: &[u8]) -> Option<KeyBinding> {
    (!certificate.is_empty() || !signature.is_empty()).then(|| KeyBinding {
        certificate: certificate.to_vec(),
        signature: signature.to_vec(),
    })
}

pub fn round_pb(info: &RoundInfo) -> pb::SecureRound {
    pb::SecureRound {
        scheme: SCHEME.into(),
        seed: info.seed.0.to_le_bytes().to_vec(),
        attempt: info.attempt,
        committee: info
            .committee
            .iter()
            .map(|m| pb::CommitteeMember {
                participant_id: m.id.clone(),
                seal_key: m.seal_key.0.to_vec(),
                verify_key: m.verify_key.0.to_vec(),
                certificate: m
                    .binding
                    .as_ref()
                    .map(|b| b.certificate.clone())
                    .unwrap_or_default(),
                binding: m
                    .binding
                    .as_ref()
                    .map(|b| b.signature.clone())
                    .unwrap_or_default(),
            })
            .collect(),
        threshold: info.threshold as u32,
        t_min: info.t_min as u32,
        polynomial_size: info.params.polynomial_size as u32,
        noise_log2: info.params.noise_log2,
        smudging_log2: info.params.smudging_log2,
        delta_log: info.codec.delta_log,
        frac_bits: info.codec.frac_bits,
        clip: info.codec.clip,
        max_total_weight: info.codec.max_total_weight,
        weight_unit: info.weight_unit,
    }
}

/// The round a task describes, validated (committee, threshold, capacity).
pub fn round_from_pb(
    job: &str,
    round: u64,
    m: &pb::SecureRound,
) -> Result<RoundInfo, ProtocolError> {
    if m.scheme != SCHEME {
        return Err(ProtocolError::Malformed(format!(
            "secure aggregation scheme {:?} is not supported (this build speaks {SCHEME:?})",
            m.scheme
        )));
    }
    let seed = u128::from_le_bytes(fixed(&m.seed, "seed")?);
    let committee = m
        .committee
        .iter()
        .map(|c| {
            Ok(MemberInfo {
                id: c.participant_id.clone(),
                seal_key: MemberPublic(bytes32(&c.seal_key, "committee seal_key")?),
                verify_key: VerifyKey(bytes32(&c.verify_key, "committee verify_key")?),
                binding: binding_from(&c.certificate, &c.binding),
            })
        })
        .collect::<Result<Vec<_>, ProtocolError>>()?;
    let info = RoundInfo {
        job: job.to_string(),
        round,
        attempt: m.attempt,
        seed: RoundSeed(seed),
        committee,
        threshold: m.threshold as usize,
        t_min: m.t_min as usize,
        codec: Codec {
            delta_log: m.delta_log,
            frac_bits: m.frac_bits,
            clip: m.clip,
            max_total_weight: m.max_total_weight,
        },
        params: GlweParams {
            polynomial_size: m.polynomial_size as usize,
            noise_log2: m.noise_log2,
            smudging_log2: m.smudging_log2,
        },
        weight_unit: m.weight_unit,
    };
    info.validate()
        .map_err(|e| ProtocolError::Malformed(format!("secure round: {e}")))?;
    Ok(info)
}

pub fn sealed_pb(p: &SealedPiece) -> pb::SealedPiece {
    pb::SealedPiece {
        recipient: p.recipient.clone(),
        piece: p.piece,
        ephemeral: p.sealed.ephemeral.to_vec(),
        ciphertext: p.sealed.ciphertext.clone(),
    }
}

pub fn sealed_from_pb(p: &pb::SealedPiece) -> Result<SealedPiece, ProtocolError> {
    Ok(SealedPiece {
        recipient: p.recipient.clone(),
        piece: p.piece,
        sealed: Sealed {
            ephemeral: bytes32(&p.ephemeral, "sealed piece ephemeral key")?,
            ciphertext: p.ciphertext.clone(),
        },
    })
}

pub fn record_pb(r: &UploadRecord, keys: &PublicKeys) -> pb::UploadRecord {
    let b = keys.binding.as_ref();
    pb::UploadRecord {
        participant_id: r.participant.clone(),
        weight: r.weight,
        bodies_sha256: r.bodies_sha256.to_vec(),
        piece_hashes: r.piece_hashes.iter().map(|h| h.to_vec()).collect(),
        signature: r.signature.to_vec(),
        verify_key: keys.verify.0.to_vec(),
        certificate: b.map(|b| b.certificate.clone()).unwrap_or_default(),
        binding: b.map(|b| b.signature.clone()).unwrap_or_default(),
        seal_key: keys.seal.0.to_vec(),
    }
}

pub fn record_from_pb(r: &pb::UploadRecord) -> Result<(UploadRecord, PublicKeys), ProtocolError> {
    Ok((
        UploadRecord {
            participant: r.participant_id.clone(),
            weight: r.weight,
            bodies_sha256: bytes32(&r.bodies_sha256, "bodies_sha256")?,
            piece_hashes: r
                .piece_hashes
                .iter()
                .map(|h| bytes32(h, "piece hash"))
                .collect::<Result<_, _>>()?,
            signature: bytes64(&r.signature, "upload signature")?,
        },
        PublicKeys {
            seal: MemberPublic(bytes32(&r.seal_key, "seal_key")?),
            verify: VerifyKey(bytes32(&r.verify_key, "verify_key")?),
            binding: binding_from(&r.certificate, &r.binding),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn a_round_survives_the_wire_and_bad_fields_are_named() {
        let info = RoundInfo {
            job: "j".into(),
            round: 4,
            attempt: 2,
            seed: RoundSeed(u128::MAX - 5),
            committee: (0..3)
                .map(|i| MemberInfo {
                    id: format!("m{i}"),
                    seal_key: MemberPublic([i as u8 + 1; 32]),
                    verify_key: VerifyKey([i as u8 + 9; 32]),
                    binding: (i == 1).then(|| KeyBinding {
                        certificate: vec![1, 2, 3],
                        signature: vec![4, 5],
                    }),
                })
                .collect(),
            threshold: 2,
            t_min: 2,
            codec: Codec::default(),
            params: GlweParams::default(),
            weight_unit: 7,
        };
        let wire = round_pb(&info);
        assert_eq!(round_from_pb("j", 4, &wire).unwrap(), info);
        let mut bad = wire.clone();
        bad.seed.pop();
        let e = round_from_pb("j", 4, &bad).unwrap_err().to_string();
        assert!(e.contains("seed must be 16 bytes"), "{e}");
        let mut bad = wire.clone();
        bad.threshold = 1;
        let e = round_from_pb("j", 4, &bad).unwrap_err().to_string();
        assert!(e.contains("strict majority"), "{e}");
        let mut bad = wire;
        bad.scheme = "ckks".into();
        assert!(round_from_pb("j", 4, &bad).is_err());
    }

    #[cfg(feature = "model")]
    /// Every byte of a whole secure upload of the Fashion-MNIST CNN (52,138 parameters) as
    /// encoded on the wire, against the same update in plaintext f32.
    #[test]
    fn a_secure_upload_of_the_cnn_is_under_2x_its_plaintext_size() {
        use cohort_crypto::aggregation::protect;
        use cohort_crypto::{MemberSecret, SeedLog, Signer25519};
        use rand::SeedableRng;
        use rand::rngs::ChaCha8Rng;

        let spec = cohort_model::ModelSpec::Cnn {
            channels: 1,
            height: 28,
            width: 28,
            classes: 10,
        };
        let n = spec.num_parameters();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let members: Vec<(MemberSecret, Signer25519)> = (0..5)
            .map(|_| {
                (
                    MemberSecret::generate(&mut rng),
                    Signer25519::generate(&mut rng),
                )
            })
            .collect();
        let info = RoundInfo {
            job: "fashion".into(),
            round: 1,
            attempt: 1,
            seed: RoundSeed(9),
            committee: members
                .iter()
                .enumerate()
                .map(|(i, (s, v))| MemberInfo {
                    id: format!("participant-{i:03}"),
                    seal_key: s.public(),
                    verify_key: v.verify_key(),
                    // A realistic binding: a P-256 certificate and signature.
                    binding: Some(KeyBinding {
                        certificate: vec![0; 480],
                        signature: vec![0; 72],
                    }),
                })
                .collect(),
            threshold: 3,
            t_min: 2,
            codec: Codec::default(),
            params: GlweParams::default(),
            weight_unit: 60,
        };
        let update = vec![0.01f32; n];
        let up = protect(
            &info,
            "participant-007",
            &members[0].1,
            &mut SeedLog::default(),
            &update,
            6000,
            &mut rng,
        )
        .unwrap();
        let header = |secure| pb::UpdateHeader {
            nonce: vec![7; crate::NONCE_BYTES],
            session_id: "0123456789abcdef0123456789abcdef".into(),
            job_id: "fashion".into(),
            round: 1,
            num_parameters: n as u64,
            num_examples: 6000,
            train: None,
            train_seconds: 1.0,
            secure,
        };
        let wire = |chunks: Vec<pb::UpdateChunk>| -> usize {
            chunks.iter().map(|c| c.encoded_len()).sum()
        };
        let plain = wire(crate::update_chunks(header(None), &update));
        let bodies: Vec<crate::Body> = up.bodies.iter().map(|&b| crate::Body(b)).collect();
        let secure = wire(crate::update_chunks(
            header(Some(pb::SecureUpload {
                weight: up.weight,
                pieces: up.pieces.iter().map(sealed_pb).collect(),
                signature: up.signature.to_vec(),
                num_bodies: up.bodies.len() as u64,
            })),
            &bodies,
        ));
        let ratio = secure as f64 / plain as f64;
        eprintln!(
            "CNN upload: plaintext {plain} bytes, secure {secure} bytes ({:.2} bytes per parameter, {ratio:.3}x)",
            secure as f64 / n as f64
        );
        assert!(
            ratio <= 2.0,
            "secure upload is {ratio:.3}x the plaintext one"
        );
    }
}
