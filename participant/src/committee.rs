//! Secure aggregation as a participant and committee member: this node's keys and memory
//! (never written to disk), and answering decryption tasks after checking the manifest.

use super::*;

/// This participant's secure-aggregation secrets and memory, for the life of the process.
/// Nothing here is written to disk: after a restart the participant has new keys, so pieces
/// sealed to the old ones cannot be opened by anyone, and a forgotten seed or manifest cannot
/// be abused (the old keys are gone with them).
pub(crate) struct Secrets {
    pub(crate) seal: MemberSecret,
    pub(crate) sign: Signer25519,
    pub(crate) policy: MemberPolicy,
    pub(crate) seeds: SeedLog,
    /// Round seed of each (job, round, attempt) this participant trained in.
    pub(crate) round_seeds: BTreeMap<(String, u64, u32), RoundSeed>,
    pub(crate) rng: ChaCha20Rng,
}

impl Secrets {
    pub(crate) fn generate() -> Self {
        let mut rng = ChaCha20Rng::from_rng(&mut rand::rng());
        Secrets {
            seal: MemberSecret::generate(&mut rng),
            sign: Signer25519::generate(&mut rng),
            policy: MemberPolicy::default(),
            seeds: SeedLog::default(),
            round_seeds: BTreeMap::new(),
            rng,
        }
    }

    /// The public keys to join with, signed by the certificate's key under TLS.
    pub(crate) fn keys(
        &self,
        tls: Option<&cohort_protocol::tls::NodeTls>,
    ) -> Result<pb::SecureKeys, AgentError> {
        let (seal, verify) = (self.seal.public().0, self.sign.verify_key().0);
        let binding = match tls {
            Some(t) => cohort_crypto::pki::sign_with_key(
                &t.key_pem,
                &cohort_crypto::pki::binding_message(&seal, &verify),
            )
            .map_err(|e| AgentError::Address("certificate key".into(), e.to_string()))?,
            None => Vec::new(),
        };
        Ok(pb::SecureKeys {
            seal_key: seal.to_vec(),
            verify_key: verify.to_vec(),
            binding,
        })
    }
}

pub(crate) type SharedSecrets = Arc<Mutex<Secrets>>;

pub(crate) fn lock(s: &SharedSecrets) -> std::sync::MutexGuard<'_, Secrets> {
    s.lock().expect("secrets lock poisoned")
}

/// A committee member's part: fetch the manifest's records and this member's pieces, check
/// them against the task and the coordinator's signature, then answer (or refuse) under the
/// member policy.
pub(crate) async fn decrypt_round(
    s: &mut Session,
    opts: &AgentOptions,
    secrets: &SharedSecrets,
    d: pb::DecryptTask,
) -> Result<(), Status> {
    use pb::decryption_input::Kind as In;
    let info = d
        .secure
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("decrypt task without its round"))
        .and_then(|r| {
            round_from_pb(&d.job_id, d.round, r)
                .map_err(|e| Status::invalid_argument(e.to_string()))
        })?;
    let delay = opts.faults.answer_delay;
    if !delay.is_zero() {
        tracing::info!(participant = %opts.id, round = d.round, "fault injection: delaying the decryption by {delay:?}");
        tokio::time::sleep(delay).await;
    }
    let mut stream = s
        .client
        .fetch_decryption_input(pb::FetchDecryptionInputRequest {
            session_id: s.id.clone(),
            job_id: d.job_id.clone(),
            round: d.round,
            attempt: info.attempt,
        })
        .await?
        .into_inner();
    let (mut records, mut keys, mut pieces) = (Vec::new(), BTreeMap::new(), Vec::new());
    let mut public = Vec::new();
    let malformed = |e: cohort_protocol::ProtocolError| Status::invalid_argument(e.to_string());
    while let Some(item) = stream.message().await? {
        match item.kind {
            Some(In::Upload(u)) => {
                let (rec, pk) = record_from_pb(&u).map_err(malformed)?;
                keys.insert(rec.participant.clone(), pk.verify);
                public.push((rec.participant.clone(), pk));
                records.push(rec);
            }
            Some(In::Piece(p)) => {
                let piece = p
                    .piece
                    .as_ref()
                    .ok_or_else(|| Status::invalid_argument("piece missing"))?;
                pieces.push((p.sender.clone(), sealed_from_pb(piece).map_err(malformed)?));
            }
            None => {}
        }
    }
    let manifest = info.manifest(
        records
            .iter()
            .map(|r| (r.participant.clone(), r.weight))
            .collect(),
    );
    let assigned: Vec<usize> = d.pieces.iter().map(|&k| k as usize).collect();
    let (me, sec) = (opts.id.clone(), secrets.clone());
    let (task_digest, count) = (d.manifest_digest.clone(), d.manifest_participants as usize);
    let (coord_key, coord_sig) = (d.coordinator_key.clone(), d.manifest_signature.clone());
    let ca = opts.tls.as_ref().map(|t| t.ca_pem.clone());
    let answer = with_heartbeats(s, move || {
        // Every participant's signature key must be its own, vouched for by its certificate.
        if let Some(ca) = &ca {
            for (id, pk) in &public {
                pk.check(ca, id, std::time::SystemTime::now())
                    .map_err(|e| e.to_string())?;
            }
        }
        let named = bytes32(&task_digest, "manifest_digest").map_err(|e| e.to_string())?;
        let key = bytes32(&coord_key, "coordinator_key").map_err(|e| e.to_string())?;
        let sig = bytes64(&coord_sig, "manifest_signature").map_err(|e| e.to_string())?;
        cohort_crypto::sign::verify_manifest(
            &manifest,
            &named,
            count,
            &cohort_crypto::VerifyKey(key),
            &sig,
        )
        .map_err(|e| e.to_string())?;
        let mut guard = lock(&sec);
        let x = &mut *guard;
        if let Some(seed) = x
            .round_seeds
            .get(&(info.job.clone(), info.round, info.attempt))
            && *seed != info.seed
        {
            return Err(format!(
                "the task names seed {:032x}, but this round's seed was {:032x}",
                info.seed.0, seed.0
            ));
        }
        let len = d.num_parameters as usize;
        let req = ShareRequest {
            info: &info,
            manifest: &manifest,
            uploads: &records,
            keys: &keys,
            pieces: &pieces,
            assigned: &assigned,
            len,
        };
        aggregation::answer(&req, &me, &x.seal, &x.sign, &mut x.policy, &mut x.rng)
            .map_err(|e| e.to_string())
    })
    .await;
    let mut header = pb::ShareHeader {
        nonce: nonce(),
        session_id: s.id.clone(),
        job_id: d.job_id.clone(),
        round: d.round,
        attempt: d.secure.as_ref().map_or(0, |r| r.attempt),
        request: d.request,
        pieces: d.pieces.clone(),
        num_values: 0,
        signature: Vec::new(),
        refused: String::new(),
    };
    let chunks = match answer {
        Ok((share, signature)) => {
            header.num_values = share.len() as u64;
            header.signature = signature.to_vec();
            cohort_protocol::share_chunks(header, &share)
        }
        Err(reason) => {
            tracing::warn!(participant = %opts.id, round = d.round, "refusing to decrypt: {reason}");
            header.refused = reason;
            vec![pb::ShareChunk {
                part: Some(pb::share_chunk::Part::Header(header)),
            }]
        }
    };
    s.client.submit_share(futures::stream::iter(chunks)).await?;
    tracing::info!(participant = %opts.id, round = d.round, pieces = ?d.pieces, "decryption share sent");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cohort_crypto::aggregation::PublicKeys;
    use cohort_crypto::pki::{Authority, Role, Validity};
    use std::time::SystemTime;

    /// The keys as the coordinator relays them: the TLS certificate the node presented,
    /// with the node's signature over its keys.
    fn public(k: &pb::SecureKeys, cert_pem: &str) -> PublicKeys {
        PublicKeys {
            seal: cohort_crypto::MemberPublic(k.seal_key.clone().try_into().unwrap()),
            verify: cohort_crypto::VerifyKey(k.verify_key.clone().try_into().unwrap()),
            binding: Some(cohort_crypto::aggregation::KeyBinding {
                certificate: cohort_crypto::pki::der_of(cert_pem).unwrap(),
                signature: k.binding.clone(),
            }),
        }
    }

    #[test]
    fn every_process_has_new_keys_and_binds_them_to_its_certificate() {
        let (a, b) = (Secrets::generate(), Secrets::generate());
        let (ka, kb) = (a.keys(None).unwrap(), b.keys(None).unwrap());
        assert_ne!(
            ka.seal_key, kb.seal_key,
            "keys are never reused across processes"
        );
        assert_eq!((ka.seal_key.len(), ka.verify_key.len()), (32, 32));
        assert!(ka.binding.is_empty(), "no binding without a certificate");

        let now = SystemTime::now();
        let ca = Authority::generate("test federation", &Validity::days(now, 1)).unwrap();
        let issued = ca
            .issue(
                "site-a",
                Role::Participant,
                &[],
                &[],
                &Validity::days(now, 1),
            )
            .unwrap();
        let tls = cohort_protocol::tls::NodeTls {
            ca_pem: ca.cert_pem().to_string(),
            cert_pem: issued.cert_pem.clone(),
            key_pem: issued.key_pem.clone(),
            server_name: "coordinator".into(),
        };
        let bound = public(&a.keys(Some(&tls)).unwrap(), &issued.cert_pem);
        bound.check(ca.cert_pem(), "site-a", now).unwrap();
        // The binding speaks for site-a's keys only.
        assert!(bound.check(ca.cert_pem(), "site-b", now).is_err());
        let mut other = public(&b.keys(Some(&tls)).unwrap(), &issued.cert_pem);
        other.seal = bound.seal;
        assert!(other.check(ca.cert_pem(), "site-a", now).is_err());
    }
}
