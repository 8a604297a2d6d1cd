//! `panscreen evaluate`: a run's results against a synthetic cohort's ground truth.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use arrow::array::{Array, BooleanArray, Float64Array, StringArray};
use arrow::record_batch::RecordBatch;
use panscreen_shared::pseudonym::Pseudonymizer;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// Every `.parquet` file under `directory`, sorted.
pub fn parquet_files(directory: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![directory.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder)
            .with_context(|| format!("cannot read {}", folder.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

pub fn read_batches(path: &Path) -> anyhow::Result<Vec<RecordBatch>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    Ok(reader.collect::<Result<Vec<_>, _>>()?)
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> anyhow::Result<&'a T> {
    batch
        .column_by_name(name)
        .with_context(|| format!("column {name} is missing"))?
        .as_any()
        .downcast_ref::<T>()
        .with_context(|| format!("column {name} has an unexpected type"))
}

#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub labelled: usize,
    pub scored: usize,
    pub positives: usize,
    pub negatives: usize,
    pub true_positives: usize,
    pub true_negatives: usize,
    pub mean_probability_positive: f64,
    pub mean_probability_negative: f64,
    pub auc: f64,
}

impl Evaluation {
    pub fn sensitivity(&self) -> f64 {
        self.true_positives as f64 / self.positives.max(1) as f64
    }

    pub fn specificity(&self) -> f64 {
        self.true_negatives as f64 / self.negatives.max(1) as f64
    }

    pub fn render(&self) -> String {
        format!(
            "studies labelled {}, scored {}\n\
             lesion studies {}, without lesion {}\n\
             sensitivity {:.3} ({}/{}), specificity {:.3} ({}/{})\n\
             AUC {:.3}; mean probability with lesion {:.3}, without {:.3}\n",
            self.labelled,
            self.scored,
            self.positives,
            self.negatives,
            self.sensitivity(),
            self.true_positives,
            self.positives,
            self.specificity(),
            self.true_negatives,
            self.negatives,
            self.auc,
            self.mean_probability_positive,
            self.mean_probability_negative
        )
    }
}

/// Area under the ROC curve (Mann–Whitney; ties count half).
pub fn auc(positive: &[f64], negative: &[f64]) -> f64 {
    if positive.is_empty() || negative.is_empty() {
        return f64::NAN;
    }
    let mut wins = 0.0;
    for p in positive {
        for n in negative {
            wins += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (positive.len() * negative.len()) as f64
}

pub fn evaluate(
    labels: &Path,
    results: &Path,
    pseudonymizer: &Pseudonymizer,
) -> anyhow::Result<Evaluation> {
    let mut truth: HashMap<String, bool> = HashMap::new();
    for batch in read_batches(labels)? {
        let uids = column::<StringArray>(&batch, "study_instance_uid")?;
        let present = column::<BooleanArray>(&batch, "lesion_present")?;
        for row in 0..batch.num_rows() {
            truth.insert(pseudonymizer.study(uids.value(row)), present.value(row));
        }
    }
    let mut scores: Vec<(bool, f64, bool)> = Vec::new();
    for file in parquet_files(&results.join("results"))? {
        for batch in read_batches(&file)? {
            let keys = column::<StringArray>(&batch, "study_key")?;
            let probability = column::<Float64Array>(&batch, "lesion_probability")?;
            let flagged = column::<BooleanArray>(&batch, "flagged")?;
            for row in 0..batch.num_rows() {
                if let Some(lesion) = truth.get(keys.value(row)) {
                    scores.push((*lesion, probability.value(row), flagged.value(row)));
                }
            }
        }
    }
    let positive: Vec<f64> = scores.iter().filter(|s| s.0).map(|s| s.1).collect();
    let negative: Vec<f64> = scores.iter().filter(|s| !s.0).map(|s| s.1).collect();
    let mean = |values: &[f64]| {
        if values.is_empty() {
            f64::NAN
        } else {
            values.iter().sum::<f64>() / values.len() as f64
        }
    };
    Ok(Evaluation {
        labelled: truth.len(),
        scored: scores.len(),
        positives: positive.len(),
        negatives: negative.len(),
        true_positives: scores.iter().filter(|s| s.0 && s.2).count(),
        true_negatives: scores.iter().filter(|s| !s.0 && !s.2).count(),
        mean_probability_positive: mean(&positive),
        mean_probability_negative: mean(&negative),
        auc: auc(&positive, &negative),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_of_perfect_random_and_tied_scores() {
        assert_eq!(auc(&[0.9, 0.8], &[0.1, 0.2]), 1.0);
        assert_eq!(auc(&[0.1], &[0.9]), 0.0);
        assert_eq!(auc(&[0.5], &[0.5]), 0.5);
    }
}
