//! A job that starts from a model trained elsewhere: no `train` in the pipeline, the network
//! imported from a PyTorch state dict (safetensors) named by `model.source`.

use std::time::Duration;

use lathe_model::artifact::Artifact;
use lathe_proto::JobState;
use lathe_tests::*;

fn fixture() -> String {
    let path =
        proto_dir().join("../crates/lathe-model/tests/fixtures/torch_mlp_64_32_10.safetensors");
    path.canonicalize()
        .expect("the torch fixture")
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_starts_from_a_pytorch_state_dict() {
    let s = stack().await;
    let distiller = start_stage(
        &s.server.url(),
        "d1",
        "lathe-distiller",
        lathe_distiller::Distiller,
    )
    .await;
    let spec = format!(
        r#"{{"name": "imported", "dataset": {{"source": "builtin:digits"}},
            "model": {{"source": "file:{}"}}, "train": {{"seed": 3}},
            "distill": {{"student_hidden": [16], "epochs": 5}}, "pipeline": ["distill"]}}"#,
        fixture()
    );
    let job = submit(&s.res, spec.as_bytes()).await;
    let r = wait_job(&s.res, job, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    let bytes = s
        .res
        .artifacts
        .get(r.steps[0].artifact.as_ref().unwrap())
        .await
        .unwrap();
    let student = Artifact::from_bytes(&bytes).unwrap();
    let stages: Vec<&str> = student.lineage.iter().map(|l| l.stage.as_str()).collect();
    assert_eq!(stages.first(), Some(&"import"), "{stages:?}");
    assert_eq!(stages.last(), Some(&"distill"), "{stages:?}");
    assert!(
        student.lineage[0].metrics.contains_key("test_accuracy"),
        "the imported model was evaluated"
    );

    // A source that does not exist fails the job, naming it.
    let spec = br#"{"name": "missing", "dataset": {"source": "builtin:digits"},
        "model": {"source": "file:/nowhere/model.safetensors"}, "pipeline": ["distill"]}"#;
    let job = submit(&s.res, spec).await;
    let r = wait_job(&s.res, job, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Failed);
    assert!(
        r.error
            .as_deref()
            .unwrap_or("")
            .contains("/nowhere/model.safetensors"),
        "{:?}",
        r.error
    );
    distiller.stop().await;
}
