//! From a spec's `dataset` section to train/validation/test splits: fetch the bytes from
//! where the source says (built-in, a file on the worker, the `lathe-datasets` bucket), parse
//! them in the stated format, split by seed. Every stage that needs the job's data (train,
//! distill, prune, quantize, deploy) loads it the same way, so the splits agree.

use crate::worker::{StageError, TaskContext};
use lathe_model::data::{self, Dataset, Splits};
use lathe_proto::spec::{DataSource, DatasetFormat, DatasetSpec};

async fn fetch(ctx: &TaskContext, source: &DataSource) -> Result<Vec<u8>, StageError> {
    match source {
        DataSource::File(path) => tokio::fs::read(path)
            .await
            .map_err(|e| StageError::Permanent(format!("dataset file `{path}`: {e}"))),
        DataSource::Bucket(name) => ctx.load_dataset(name).await,
        DataSource::Builtin(name) => Err(StageError::Permanent(format!(
            "built-in `{name}` cannot be read as a file"
        ))),
    }
}

async fn load_one(
    ctx: &TaskContext,
    spec: &DatasetSpec,
    source: &DataSource,
    labels: Option<&DataSource>,
) -> Result<Dataset, StageError> {
    let bytes = fetch(ctx, source).await?;
    let bad = |e: data::DataError| StageError::Permanent(format!("dataset `{source}`: {e}"));
    match spec.format.unwrap_or(DatasetFormat::Csv) {
        DatasetFormat::Csv => data::parse_csv(&bytes, &spec.label_column).map_err(bad),
        DatasetFormat::Idx => {
            let labels = labels.ok_or_else(|| {
                StageError::Permanent("dataset.labels: required for IDX data".into())
            })?;
            let label_bytes = fetch(ctx, labels).await?;
            data::parse_idx(&bytes, &label_bytes).map_err(bad)
        }
    }
}

/// Loads and splits the job's data. Bad data is a permanent failure naming the source.
pub async fn load_splits(
    ctx: &TaskContext,
    spec: &DatasetSpec,
    seed: u64,
) -> Result<Splits, StageError> {
    let (main, test) = match &spec.source {
        DataSource::Builtin(name) => {
            let (train, test) = data::builtin(name)
                .map_err(|e| StageError::Permanent(format!("dataset.source: {e}")))?;
            (train, Some(test))
        }
        source => {
            let main = load_one(ctx, spec, source, spec.labels.as_ref()).await?;
            let test = match &spec.test {
                Some(t) => Some(load_one(ctx, spec, &t.source, t.labels.as_ref()).await?),
                None => None,
            };
            (main, test)
        }
    };
    data::split(
        main,
        test,
        spec.validation_fraction as f32,
        spec.test_fraction as f32,
        seed,
    )
    .map_err(|e| StageError::Permanent(format!("dataset: {e}")))
}

/// The model a stage starts from: the previous stage's artifact, or — for a pipeline without
/// `train` — the network imported from `model.source` (a PyTorch `nn.Sequential` state dict
/// in safetensors). An imported network is taken to expect inputs standardised on the job's
/// train split (population std, as scikit-learn's `StandardScaler` does), so that scaler is
/// fitted here and stored with it; its test accuracy is measured and recorded.
pub async fn input_model(
    ctx: &TaskContext,
    task: &lathe_proto::StageTask,
    splits: &Splits,
) -> Result<lathe_model::Artifact, StageError> {
    use lathe_model::{Artifact, Engine, Standardizer};
    if let Some(r) = &task.input {
        let bytes = ctx.load_artifact(r).await?;
        return Artifact::from_bytes(&bytes)
            .map_err(|e| StageError::Permanent(format!("artifact `{}`: {e}", r.name)));
    }
    let Some(source) = &task.spec.model.source else {
        return Err(StageError::Permanent(
            "no input artifact: the pipeline has no `train` and model.source is not set".into(),
        ));
    };
    let bytes = fetch(ctx, source).await?;
    let bad = |what: String| StageError::Permanent(format!("model.source `{source}`: {what}"));
    let (config, layers) =
        lathe_model::interop::import_safetensors(&bytes).map_err(|e| bad(e.to_string()))?;
    if config.input != splits.train.n_features {
        return Err(bad(format!(
            "the network takes {} inputs but the dataset has {} features",
            config.input, splits.train.n_features
        )));
    }
    if config.classes != splits.train.n_classes() {
        return Err(bad(format!(
            "the network has {} outputs but the dataset has {} classes",
            config.classes,
            splits.train.n_classes()
        )));
    }
    let mut artifact = Artifact::from_imported(
        config,
        layers,
        Standardizer::fit(&splits.train),
        splits.train.feature_names.clone(),
        splits.train.class_labels.clone(),
    )
    .map_err(|e| bad(e.to_string()))?;
    let engine = Engine::from_artifact(&artifact).map_err(|e| bad(e.to_string()))?;
    let test =
        lathe_model::eval::try_evaluate(&engine, &splits.test).map_err(|e| bad(e.to_string()))?;
    let validation = lathe_model::eval::try_evaluate(&engine, &splits.validation)
        .map_err(|e| bad(e.to_string()))?;
    artifact
        .metrics
        .insert("test_accuracy".into(), test.accuracy);
    artifact
        .metrics
        .insert("validation_accuracy".into(), validation.accuracy);
    if let Some(entry) = artifact.lineage.last_mut() {
        entry.metrics = artifact.metrics.clone();
    }
    Ok(artifact)
}
