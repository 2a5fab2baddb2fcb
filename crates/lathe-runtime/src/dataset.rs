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
