//! The Federation service over a real loopback socket: bad input is refused with the right
//! status code, never aggregated, and the round goes on.

use std::collections::BTreeSet;
use std::time::Duration;

use cohort_coordinator::round::{Event, JobConfig};
use cohort_coordinator::strategy::FedAvg;
use cohort_coordinator::{Coordinator, ModelStore, Orchestrator};
use cohort_model::{ModelSpec, Optimizer, TrainConfig};
use cohort_protocol::pb::federation_client::FederationClient;
use cohort_protocol::pb::{self, task::Kind, update_chunk::Part};
use tonic::Code;
use tonic::transport::Channel;

const P: usize = 62; // logistic regression, 30 inputs, 2 classes

fn job() -> JobConfig {
    JobConfig {
        job_id: "j".into(),
        model: ModelSpec::Logistic {
            inputs: 30,
            classes: 2,
        },
        train: TrainConfig {
            epochs: 1,
            batch_size: 8,
            learning_rate: 0.1,
            optimizer: Optimizer::Sgd,
            seed: 0,
            proximal_mu: 0.0,
            momentum: 0.0,
            weight_decay: 0.0,
        },
        rounds: 2,
        min_participants: 2,
        fraction: 1.0,
        sampling: Default::default(),
        min_updates: 2,
        round_timeout: Duration::from_secs(30),
        eval_timeout: Duration::from_secs(30),
        evaluate: false,
        evaluate_fraction: 1.0,
        liveness_timeout: Duration::from_secs(30),
        seed: 3,
        secure: None,
        data: None,
        clip_norm: None,
        clip_per_layer: false,
        privacy: None,
        emulated_codec: None,
        control_variates: false,
        adaptive_clipping: None,
    }
}

async fn start() -> (Coordinator, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let allowed: BTreeSet<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
    let orch =
        Orchestrator::new(job(), Box::new(FedAvg::default()), Some(allowed), [7; 32]).unwrap();
    let store = ModelStore::open(dir.path()).unwrap();
    let c = Coordinator::start(orch, store).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let c2 = c.clone();
    tokio::spawn(async move { c2.serve(listener, std::future::pending()).await });
    (c, addr, dir)
}

async fn client(addr: &str) -> FederationClient<Channel> {
    FederationClient::connect(addr.to_string()).await.unwrap()
}

async fn join(c: &mut FederationClient<Channel>, id: &str) -> String {
    c.join(pb::JoinRequest {
        participant_id: id.into(),
        num_examples: 10,
        client_version: "test".into(),
        keys: None,
    })
    .await
    .unwrap()
    .into_inner()
    .session_id
}

async fn poll(c: &mut FederationClient<Channel>, session: &str) -> pb::Task {
    c.poll_task(pb::PollTaskRequest {
        session_id: session.into(),
        wait_ms: 5000,
    })
    .await
    .unwrap()
    .into_inner()
}

/// A fresh 16-byte nonce for every message.
fn nonce() -> Vec<u8> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    [n.to_le_bytes(), (n ^ 0x5bd1_e995).to_le_bytes()].concat()
}

fn header(session: &str, round: u64, n: u64) -> pb::UpdateHeader {
    pb::UpdateHeader {
        nonce: nonce(),
        session_id: session.into(),
        job_id: "j".into(),
        round,
        num_parameters: n,
        num_examples: 10,
        train: None,
        train_seconds: 0.0,
        secure: None,
    }
}

async fn send(
    c: &mut FederationClient<Channel>,
    chunks: Vec<pb::UpdateChunk>,
) -> Result<(), tonic::Status> {
    c.submit_update(futures::stream::iter(chunks))
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_updates_get_the_right_status_and_are_never_aggregated() {
    let (coord, addr, _dir) = start().await;
    let mut events = coord.subscribe();
    let (mut ca, mut cb) = (client(&addr).await, client(&addr).await);

    // A stranger cannot join; an unknown session cannot poll.
    let e = ca
        .join(pb::JoinRequest {
            participant_id: "mallory".into(),
            num_examples: 1,
            client_version: "x".into(),
            keys: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = ca
        .poll_task(pb::PollTaskRequest {
            session_id: "forged".into(),
            wait_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    let sa = join(&mut ca, "a").await;
    let sb = join(&mut cb, "b").await;
    let Some(Kind::Train(t)) = poll(&mut ca, &sa).await.kind else {
        panic!("expected a training task");
    };
    assert_eq!(
        (t.round, t.num_parameters, t.model_version),
        (1, P as u64, 0)
    );

    // The global model downloads intact.
    let mut s = ca
        .fetch_model(pb::FetchModelRequest {
            session_id: sa.clone(),
            job_id: "j".into(),
            version: 0,
            control_variate: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut asm = cohort_protocol::ParamAssembler::new(P as u64);
    let mut digest = String::new();
    while let Some(chunk) = s.message().await.unwrap() {
        asm.push(&chunk.data).unwrap();
        digest = chunk.digest;
    }
    let global0 = asm.finish(&t.model_digest).unwrap();
    assert_eq!(digest, t.model_digest);
    let e = ca
        .fetch_model(pb::FetchModelRequest {
            session_id: sa.clone(),
            job_id: "j".into(),
            version: 7,
            control_variate: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // A FedAvg job has no control variate to fetch.
    let e = ca
        .fetch_model(pb::FetchModelRequest {
            session_id: sa.clone(),
            job_id: "j".into(),
            version: 0,
            control_variate: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("SCAFFOLD"), "{}", e.message());

    let good = vec![1.0f32; P];
    // Wrong parameter count.
    let e = send(
        &mut ca,
        cohort_protocol::update_chunks(header(&sa, 1, P as u64 + 1), &vec![0.0; P + 1]),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    // More data than announced.
    let mut chunks = cohort_protocol::update_chunks(header(&sa, 1, P as u64), &good);
    chunks.insert(
        2,
        pb::UpdateChunk {
            part: Some(Part::Data(vec![0u8; 4])),
        },
    );
    let e = send(&mut ca, chunks).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // Digest mismatch (data altered in transit).
    let mut chunks = cohort_protocol::update_chunks(header(&sa, 1, P as u64), &good);
    if let Some(Part::Data(d)) = &mut chunks[1].part {
        d[0] ^= 1;
    }
    let e = send(&mut ca, chunks).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    // Unknown session.
    let e = send(
        &mut ca,
        cohort_protocol::update_chunks(header("forged", 1, P as u64), &good),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // A round that is not open.
    let e = send(
        &mut ca,
        cohort_protocol::update_chunks(header(&sa, 2, P as u64), &good),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // No trailer.
    let mut chunks = cohort_protocol::update_chunks(header(&sa, 1, P as u64), &good);
    chunks.pop();
    let e = send(&mut ca, chunks).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // An oversized message is refused by the transport's limit.
    let big = pb::UpdateChunk {
        part: Some(Part::Data(vec![
            0u8;
            cohort_protocol::MAX_MESSAGE_BYTES + 8
        ])),
    };
    let chunks = vec![
        pb::UpdateChunk {
            part: Some(Part::Header(header(&sa, 1, P as u64))),
        },
        big,
    ];
    let e = send(&mut ca, chunks).await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument
        ),
        "{e:?}"
    );

    // A message without a nonce is refused; so is a replayed one (the nonce of a refused
    // message is spent too).
    let mut h = header(&sa, 1, P as u64);
    h.nonce.clear();
    let e = send(&mut ca, cohort_protocol::update_chunks(h, &good))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("nonce"), "{e:?}");
    let mut chunks = cohort_protocol::update_chunks(header(&sa, 1, P as u64), &good);
    chunks.pop();
    let replayed = send(&mut ca, chunks.clone()).await.unwrap_err();
    assert_eq!(
        replayed.code(),
        Code::InvalidArgument,
        "no trailer: {replayed:?}"
    );
    let e = send(&mut ca, chunks).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("replay"), "{e:?}");

    // After all that, a's real update is accepted once; a duplicate is refused, and so is a
    // replay of it.
    let accepted = cohort_protocol::update_chunks(header(&sa, 1, P as u64), &good);
    send(&mut ca, accepted.clone()).await.unwrap();
    let e = send(&mut ca, accepted).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(e.message().contains("replay"), "{e:?}");
    let e = send(
        &mut ca,
        cohort_protocol::update_chunks(header(&sa, 1, P as u64), &good),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    // b's update closes the round: the new model is the mean of the two good updates only.
    send(
        &mut cb,
        cohort_protocol::update_chunks(header(&sb, 1, P as u64), &vec![3.0; P]),
    )
    .await
    .unwrap();
    let summary = loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Ok(Event::RoundCompleted {
                summary, params, ..
            })) => {
                for (g, g0) in params.iter().zip(&global0) {
                    assert!((g - (g0 + 2.0)).abs() < 1e-6);
                }
                break summary;
            }
            Ok(Ok(_)) => {}
            other => panic!("no round completion: {other:?}"),
        }
    };
    assert_eq!(summary.participants, vec!["a".to_string(), "b".to_string()]);
    assert_eq!(summary.total_examples, 20);
    // A late update for the closed round is refused.
    let e = send(
        &mut ca,
        cohort_protocol::update_chunks(header(&sa, 1, P as u64), &good),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // The round went on: round 2 is handed out.
    let Some(Kind::Train(t2)) = poll(&mut cb, &sb).await.kind else {
        panic!("expected round 2");
    };
    assert_eq!((t2.round, t2.model_version), (2, 1));
}

mod secure {
    //! A securely aggregated job over the socket: malformed keys, plaintext updates, wrong
    //! sizes, forged signatures and strangers asking for key pieces are refused.

    use super::*;
    use cohort_coordinator::round::SecureSettings;
    use cohort_crypto::aggregation::protect;
    use cohort_crypto::{MemberSecret, SeedLog, Signer25519};
    use cohort_protocol::secure::{round_from_pb, sealed_pb};
    use rand::SeedableRng;
    use rand::rngs::ChaCha8Rng;

    struct Party {
        seal: MemberSecret,
        sign: Signer25519,
    }

    impl Party {
        fn new(seed: u64) -> Self {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            Party {
                seal: MemberSecret::generate(&mut rng),
                sign: Signer25519::generate(&mut rng),
            }
        }
        fn keys(&self) -> pb::SecureKeys {
            pb::SecureKeys {
                seal_key: self.seal.public().0.to_vec(),
                verify_key: self.sign.verify_key().0.to_vec(),
                binding: Vec::new(),
            }
        }
    }

    async fn join_with(
        c: &mut FederationClient<Channel>,
        id: &str,
        keys: Option<pb::SecureKeys>,
    ) -> Result<String, tonic::Status> {
        c.join(pb::JoinRequest {
            participant_id: id.into(),
            num_examples: 50,
            client_version: "test".into(),
            keys,
        })
        .await
        .map(|r| r.into_inner().session_id)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_secure_input_is_refused_with_the_right_status() {
        let dir = tempfile::tempdir().unwrap();
        let mut job = job();
        job.secure = Some(SecureSettings::default());
        let orch = Orchestrator::new(job, Box::new(FedAvg::default()), None, [7; 32]).unwrap();
        let coord = Coordinator::start(orch, ModelStore::open(dir.path()).unwrap()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let c2 = coord.clone();
        tokio::spawn(async move { c2.serve(listener, std::future::pending()).await });
        let (mut ca, mut cb) = (client(&addr).await, client(&addr).await);
        let (pa, pb_) = (Party::new(1), Party::new(2));

        // Joining a secure job without keys, or with a key of the wrong length.
        let e = join_with(&mut ca, "a", None).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let mut short = pa.keys();
        short.seal_key.pop();
        let e = join_with(&mut ca, "a", Some(short)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("seal_key"), "{}", e.message());

        let sa = join_with(&mut ca, "a", Some(pa.keys())).await.unwrap();
        let _sb = join_with(&mut cb, "b", Some(pb_.keys())).await.unwrap();
        let Some(Kind::Train(t)) = poll(&mut ca, &sa).await.kind else {
            panic!("expected a training task");
        };
        let info = round_from_pb("j", 1, t.secure.as_ref().expect("a secure round")).unwrap();
        assert_eq!(info.committee.len(), 2);

        // A plaintext update in a secure round.
        let e = send(
            &mut ca,
            cohort_protocol::update_chunks(header(&sa, 1, P as u64), &vec![1.0f32; P]),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let up = protect(
            &info,
            "a",
            &pa.sign,
            &mut SeedLog::default(),
            &[0.5; P],
            50,
            &mut rng,
        )
        .unwrap();
        let wire: Vec<cohort_protocol::Body> = up
            .bodies
            .iter()
            .map(|&b| cohort_protocol::Body(b))
            .collect();
        let secure_header = |weight: u64, num_bodies: u64| {
            let mut h = header(&sa, 1, P as u64);
            h.secure = Some(pb::SecureUpload {
                weight,
                pieces: up.pieces.iter().map(sealed_pb).collect(),
                signature: up.signature.to_vec(),
                num_bodies,
            });
            h
        };
        // Wrong number of bodies.
        let e = send(
            &mut ca,
            cohort_protocol::update_chunks(secure_header(up.weight, 5), &wire[..5]),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        // A weight other than the one signed.
        let e = send(
            &mut ca,
            cohort_protocol::update_chunks(
                secure_header(up.weight + 1, up.bodies.len() as u64),
                &wire,
            ),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("signature"), "{}", e.message());
        // Not a participant in the decryption: nothing to fetch.
        let e = ca
            .fetch_decryption_input(pb::FetchDecryptionInputRequest {
                session_id: sa.clone(),
                job_id: "j".into(),
                round: 1,
                attempt: 1,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        // The real upload is still accepted: nothing above counted.
        send(
            &mut ca,
            cohort_protocol::update_chunks(secure_header(up.weight, up.bodies.len() as u64), &wire),
        )
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_over_the_rate_limit_get_resource_exhausted_then_recover() {
    let (coord, addr, _dir) = start().await;
    coord.set_rate_limit(5.0, 10.0);
    let mut c = client(&addr).await;
    let s = join(&mut c, "a").await;
    let mut refused = 0;
    for _ in 0..30 {
        match c
            .heartbeat(pb::HeartbeatRequest {
                session_id: s.clone(),
            })
            .await
        {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                refused += 1;
            }
        }
    }
    assert!(
        refused >= 15,
        "only {refused} of 30 refused at 10 burst, 5/s"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    c.heartbeat(pb::HeartbeatRequest { session_id: s })
        .await
        .expect("tokens come back with time");
}
