//! The deployment manifests agree with the code: every service binary of the workspace has a
//! Deployment in `deploy/k8s/base` and a service in `deploy/compose.yaml` (same image,
//! command and variables); every variable they set is one the code reads; the prod overlay's
//! NATS users name only subjects, streams and consumers from `lathe_proto::names` and publish
//! work only to their successors; KEDA scales each stage on its real consumer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use lathe_proto::{Stage, names};
use serde_norway::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document of a file, merge keys (`<<`) applied.
fn docs(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|d| {
            let mut v: Value = serde::Deserialize::deserialize(d)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            v.apply_merge().expect("merge keys");
            v
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn dir_docs(dir: &Path) -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files.iter().flat_map(|f| docs(f)).collect()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn kind_name(d: &Value) -> (&str, &str) {
    (s(&d["kind"]), s(&d["metadata"]["name"]))
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter().find(|d| kind_name(d) == (kind, name))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// The service binaries: one per stage, named by `Stage::service_name`; each must be the
/// `[[bin]]` of a crate whose `main.rs` runs that service.
fn service_binaries() -> Vec<String> {
    let mut bins = Vec::new();
    for stage in Stage::ALL {
        let name = stage.service_name();
        let dir = root().join("crates").join(name);
        let manifest: toml::Table = read(&dir.join("Cargo.toml")).parse().unwrap();
        let bin = manifest["bin"]
            .as_array()
            .and_then(|b| b[0]["name"].as_str());
        assert_eq!(
            bin,
            Some(name),
            "{}: the [[bin]] should be named as the service names itself",
            dir.display()
        );
        let main = read(&dir.join("src/main.rs"));
        assert!(
            main.contains(&format!("\"{name}\"")),
            "{name}: its main.rs should run the service under its name"
        );
        bins.push(name.to_string());
    }
    bins.sort();
    bins
}

/// The environment variables lathe's code reads: the `NATS_*`, `LATHE_*` and `OTEL_*`
/// string literals of every crate's sources.
fn variables_read() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(root().join("crates")).unwrap() {
        let src = entry.unwrap().path().join("src");
        if src.is_dir() {
            walk(&src, &mut files);
        }
    }
    let mut read_names = BTreeSet::new();
    for file in files {
        let text = read(&file);
        for lit in text.split('"').skip(1).step_by(2) {
            let var = lit
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            if var
                && ["NATS_", "LATHE_", "OTEL_"]
                    .iter()
                    .any(|p| lit.starts_with(p))
            {
                read_names.insert(lit.to_string());
            }
        }
    }
    read_names
}

/// Variables lathe's containers may set that other code reads.
const FOREIGN_VARIABLES: [&str; 2] = ["RUST_LOG", "BURN_DEVICE"];

/// The variable names a container sets: `env` and every key of the ConfigMaps and Secrets of
/// its `envFrom` (looked up in `docs`).
fn container_env(container: &Value, docs: &[Value]) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = container["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|e| s(&e["name"]).to_string())
        .collect();
    for from in container["envFrom"].as_sequence().into_iter().flatten() {
        let (kind, field, r) = if from["configMapRef"].is_mapping() {
            ("ConfigMap", "data", &from["configMapRef"])
        } else {
            ("Secret", "stringData", &from["secretRef"])
        };
        let obj = find(docs, kind, s(&r["name"]))
            .unwrap_or_else(|| panic!("envFrom names a missing {kind} {}", s(&r["name"])));
        if let Some(m) = obj[field].as_mapping() {
            out.extend(m.keys().map(|k| s(k).to_string()));
        }
    }
    out
}

fn containers(d: &Value) -> &[Value] {
    d["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn assert_read_by_code(what: &str, env: &BTreeSet<String>, read_names: &BTreeSet<String>) {
    for name in env {
        assert!(
            read_names.contains(name) || FOREIGN_VARIABLES.contains(&name.as_str()),
            "{what} sets {name}, which no lathe code reads (read: {read_names:?})"
        );
    }
}

#[test]
fn every_service_has_matching_compose_and_kubernetes_manifests() {
    let bins = service_binaries();
    assert!(
        bins.contains(&"lathe-trainer".to_string()),
        "discovered {bins:?}"
    );
    let base = dir_docs(&root().join("deploy/k8s/base"));
    let compose = &docs(&root().join("deploy/compose.yaml"))[0];
    let read_names = variables_read();
    for bin in &bins {
        let deploy = find(&base, "Deployment", bin)
            .unwrap_or_else(|| panic!("{bin} has no Deployment in deploy/k8s/base"));
        let container = containers(deploy)
            .iter()
            .find(|c| strings(&c["command"]) == [bin.clone()])
            .unwrap_or_else(|| panic!("Deployment {bin} runs no container with command [{bin}]"));
        let (_, service) = compose["services"]
            .as_mapping()
            .unwrap()
            .iter()
            .find(|(_, svc)| strings(&svc["command"]) == [bin.clone()])
            .unwrap_or_else(|| panic!("{bin} has no service in deploy/compose.yaml"));
        assert_eq!(
            s(&container["image"]),
            s(&service["image"]),
            "{bin}: image differs between k8s and compose"
        );
        let k8s_env = container_env(container, &base);
        let compose_env: BTreeSet<String> = service["environment"]
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| s(k).to_string())
            .collect();
        assert_eq!(k8s_env, compose_env, "{bin}: variables differ");
        assert_read_by_code(bin, &k8s_env, &read_names);
    }
    // Every lathe container elsewhere (the provisioning Job, the prod overlay's patches).
    let prod = dir_docs(&root().join("deploy/k8s/overlays/prod"));
    let all: Vec<Value> = base.iter().chain(&prod).cloned().collect();
    for d in &all {
        for c in containers(d) {
            let lathe =
                s(&c["image"]).starts_with("lathe:") || kind_name(d).1.starts_with("lathe-");
            if lathe {
                assert_read_by_code(kind_name(d).1, &container_env(c, &all), &read_names);
            }
        }
    }
}

/// The prod overlay's NATS users (`auth.conf` is JSON with `$VARIABLE` passwords).
fn nats_users() -> Vec<serde_json::Value> {
    let text = read(&root().join("deploy/k8s/overlays/prod/auth.conf"));
    let mut json = String::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let line = match line.find(": $") {
            Some(at) => {
                let (head, tail) = line.split_at(at + 2);
                let end = tail.find([',', '}']).unwrap_or(tail.len());
                format!("{head}\"{}\"{}", &tail[..end], &tail[end..])
            }
            None => line.to_string(),
        };
        json.push_str(&line);
        json.push('\n');
    }
    let conf: serde_json::Value = serde_json::from_str(&json).expect("auth.conf is JSON");
    conf["authorization"]["users"].as_array().unwrap().clone()
}

fn allowed(user: &serde_json::Value, dir: &str) -> Vec<String> {
    user["permissions"][dir]["allow"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Every stream name lathe provisions, with the consumers it has.
fn streams() -> BTreeMap<String, Vec<String>> {
    let mut m = BTreeMap::new();
    m.insert(
        names::SUBMIT_STREAM.to_string(),
        vec![names::INTAKE_CONSUMER.to_string()],
    );
    m.insert(
        names::WORK_STREAM.to_string(),
        Stage::ALL
            .iter()
            .map(|s| names::stage_consumer(*s))
            .collect(),
    );
    m.insert(names::EVENTS_STREAM.to_string(), vec![]);
    m.insert(names::DEAD_STREAM.to_string(), vec![]);
    m.insert(names::ALERTS_STREAM.to_string(), vec![]);
    for kv in [
        names::JOBS_BUCKET,
        names::MODELS_BUCKET,
        names::HEALTH_BUCKET,
    ] {
        m.insert(format!("KV_{kv}"), vec![]);
    }
    for obj in [names::ARTIFACTS_BUCKET, names::DATASETS_BUCKET] {
        m.insert(format!("OBJ_{obj}"), vec![]);
    }
    m
}

/// Whether a permission subject names only things `names.rs` defines.
fn known_subject(subject: &str, inbox: &str) -> bool {
    let streams = streams();
    let stream_and_consumer = |rest: &[&str]| match rest {
        [stream] => streams.contains_key(*stream),
        [stream, ">"] => streams.contains_key(*stream),
        [stream, consumer, tail @ ..] => {
            streams
                .get(*stream)
                .is_some_and(|c| c.iter().any(|c| c == consumer))
                && (tail.is_empty() || tail == [">"] || tail.join(".") == subject_filter(consumer))
        }
        _ => false,
    };
    let tokens: Vec<&str> = subject.split('.').collect();
    let model = |f: fn(&lathe_proto::ModelName) -> String| {
        f(&"m".parse().unwrap()).trim_end_matches('m').to_string() + ">"
    };
    let mut lathe_subjects: Vec<String> = vec![
        names::SUBMIT_SUBJECT.into(),
        names::EVENTS_SUBJECTS.into(),
        names::dead_subject("intake"),
        model(names::infer_subject),
        model(names::feedback_subject),
        model(names::telemetry_subject),
        model(names::alerts_subject),
    ];
    for stage in Stage::ALL {
        lathe_subjects.push(names::work_subject(stage));
        lathe_subjects.push(names::dead_subject(stage.as_str()));
    }
    match tokens.as_slice() {
        ["$JS", "API", "INFO"] => true,
        ["$JS", "API", "STREAM", op, rest @ ..] if ["MSG", "DIRECT"].contains(op) => {
            matches!(rest, ["GET" | "DELETE", stream] if streams.contains_key(*stream))
        }
        ["$JS", "API", "STREAM", _, stream] => streams.contains_key(*stream),
        ["$JS", "API", "DIRECT", "GET", stream, ">"] => streams.contains_key(*stream),
        ["$JS", "API", "CONSUMER", "MSG", "NEXT", rest @ ..] => stream_and_consumer(rest),
        ["$JS", "API", "CONSUMER", _, rest @ ..] => stream_and_consumer(rest),
        ["$JS", "ACK", rest @ ..] => rest.len() == 3 && stream_and_consumer(rest),
        ["$JS", "FC", stream, ">"] => streams.contains_key(*stream),
        [
            "$JS",
            "EVENT",
            "ADVISORY",
            "CONSUMER",
            "MAX_DELIVERIES",
            rest @ ..,
        ] => rest.len() == 2 && stream_and_consumer(rest),
        ["$KV", bucket, ">"] => streams.contains_key(&format!("KV_{bucket}")),
        ["$O", bucket, ">"] => streams.contains_key(&format!("OBJ_{bucket}")),
        [first, ">"] if *first == inbox => true,
        // NATS service discovery (`$SRV.PING|INFO|STATS[.lathe-deployer[.<id>]]`).
        ["$SRV", ">"] => true,
        _ => lathe_subjects.iter().any(|s| s == subject),
    }
}

/// The filter subject a consumer is created with (the last tokens of its CREATE subject).
fn subject_filter(consumer: &str) -> String {
    Stage::ALL
        .iter()
        .find(|s| names::stage_consumer(**s) == consumer)
        .map(|s| names::work_subject(*s))
        .unwrap_or_default()
}

fn stage_of_consumer(consumer: &str) -> Option<Stage> {
    Stage::ALL
        .into_iter()
        .find(|s| names::stage_consumer(*s) == consumer)
}

#[test]
fn prod_nats_users_name_real_subjects_and_publish_work_only_downstream() {
    let prod = dir_docs(&root().join("deploy/k8s/overlays/prod"));
    let users = nats_users();
    let bins = service_binaries();
    let position = |s: Stage| Stage::ALL.iter().position(|x| *x == s).unwrap();
    let mut intake_runners = Vec::new();
    for bin in &bins {
        let patch = find(&prod, "Deployment", bin)
            .unwrap_or_else(|| panic!("{bin} has no patch in overlays/prod (its NATS user)"));
        let c = &containers(patch)[0];
        let env = |name: &str| {
            c["env"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|e| s(&e["name"]) == name)
                .map(|e| s(&e["value"]).to_string())
        };
        let secret = c["envFrom"]
            .as_sequence()
            .unwrap()
            .iter()
            .find_map(|f| f["secretRef"]["name"].as_str())
            .unwrap_or_else(|| panic!("{bin}: no NATS Secret in prod"));
        let secret = find(&prod, "Secret", secret).expect("the Secret exists in prod");
        let user_name = s(&secret["stringData"]["NATS_USER"]);
        let user = users
            .iter()
            .find(|u| u["user"] == user_name)
            .unwrap_or_else(|| panic!("{bin}: no NATS user {user_name} in auth.conf"));
        let inbox = env("NATS_INBOX_PREFIX").expect("an inbox prefix of its own");
        let publish = allowed(user, "publish");
        let subscribe = allowed(user, "subscribe");
        for subject in publish.iter().chain(&subscribe) {
            assert!(
                known_subject(subject, &inbox),
                "{bin}: `{subject}` names nothing in lathe_proto::names"
            );
        }
        assert_eq!(
            subscribe[0],
            format!("{inbox}.>"),
            "{bin}: replies on its own inbox"
        );
        // Its stage: the one consumer it may pull from.
        let pulls: Vec<Stage> = publish
            .iter()
            .filter_map(|p| {
                p.strip_prefix(&format!(
                    "$JS.API.CONSUMER.MSG.NEXT.{}.",
                    names::WORK_STREAM
                ))
            })
            .map(|c| stage_of_consumer(c).expect("a stage consumer"))
            .collect();
        assert_eq!(
            pulls.len(),
            1,
            "{bin} pulls from one stage consumer: {pulls:?}"
        );
        let stage = pulls[0];
        let runs_intake = env("LATHE_INTAKE")
            .map(|v| lathe_runtime::settings::parse_switch(&v).expect("a valid LATHE_INTAKE"))
            .unwrap_or(true);
        let intake_pull = format!(
            "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
            names::SUBMIT_STREAM,
            names::INTAKE_CONSUMER
        );
        assert_eq!(
            publish.contains(&intake_pull),
            runs_intake,
            "{bin}: may pull submissions exactly when it runs intake"
        );
        if runs_intake {
            intake_runners.push(stage);
        }
        for target in Stage::ALL {
            let may = publish.contains(&names::work_subject(target));
            let downstream = position(target) > position(stage);
            // Intake publishes a job's first task, which may be any stage: only the first
            // stage may run it, since every stage is downstream of it or itself.
            let first_task = runs_intake && position(stage) == 0;
            assert!(
                !may || downstream || first_task,
                "{bin} ({stage}) may publish to {}, which is not downstream",
                names::work_subject(target)
            );
            if runs_intake || downstream {
                assert!(may, "{bin} ({stage}) cannot hand work on to {target}");
            }
        }
        assert!(
            !publish
                .iter()
                .any(|p| p.starts_with("lathe.work.") && p.contains(['*', '>'])),
            "{bin}: wildcards over work subjects"
        );
        check_keda(&prod, bin, stage, runs_intake);
    }
    assert_eq!(
        intake_runners,
        vec![Stage::ALL[0]],
        "exactly one service runs intake in prod, the first stage's"
    );
    // The NATS pods take every user's password from that user's Secret.
    let nats = find(&prod, "StatefulSet", "nats").expect("the NATS patch");
    for user in &users {
        let var = user["password"].as_str().unwrap().trim_start_matches('$');
        let env = containers(nats)[0]["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| s(&e["name"]) == var)
            .unwrap_or_else(|| panic!("the NATS pods do not set {var}"));
        let secret = s(&env["valueFrom"]["secretKeyRef"]["name"]);
        let secret = find(&prod, "Secret", secret).expect("the Secret exists in prod");
        assert_eq!(
            secret["stringData"]["NATS_USER"],
            Value::from(user["user"].as_str().unwrap())
        );
    }
}

/// The stage's ScaledObject triggers on its own consumer of LATHE_WORK (and the intake
/// runner's on the intake consumer too).
fn check_keda(prod: &[Value], bin: &str, stage: Stage, runs_intake: bool) {
    if stage == Stage::Deploy {
        // The deployer serves inference: a CPU HorizontalPodAutoscaler, not queue lag.
        let hpa = prod
            .iter()
            .find(|d| {
                s(&d["kind"]) == "HorizontalPodAutoscaler"
                    && s(&d["spec"]["scaleTargetRef"]["name"]) == bin
            })
            .unwrap_or_else(|| panic!("{bin} has no HorizontalPodAutoscaler in overlays/prod"));
        assert_eq!(s(&hpa["spec"]["metrics"][0]["resource"]["name"]), "cpu");
        return;
    }
    let scaled = prod
        .iter()
        .find(|d| s(&d["kind"]) == "ScaledObject" && s(&d["spec"]["scaleTargetRef"]["name"]) == bin)
        .unwrap_or_else(|| panic!("{bin} has no ScaledObject in overlays/prod"));
    let mut triggers: Vec<(String, String)> = scaled["spec"]["triggers"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|t| {
            assert_eq!(s(&t["type"]), "nats-jetstream");
            (
                s(&t["metadata"]["stream"]).to_string(),
                s(&t["metadata"]["consumer"]).to_string(),
            )
        })
        .collect();
    triggers.sort();
    let mut expected = vec![(names::WORK_STREAM.to_string(), names::stage_consumer(stage))];
    if runs_intake {
        expected.push((
            names::SUBMIT_STREAM.to_string(),
            names::INTAKE_CONSUMER.to_string(),
        ));
    }
    expected.sort();
    assert_eq!(triggers, expected, "{bin}: KEDA triggers");
}
