//! The accounting table: where every object a run or a pass decided went, and why
//! (`accounting/<id>.parquet` beside the campaign's tables).

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, StringArray};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::IngestReport;

/// `run_id, outcome, reason, objects, objects_listed`: one row per outcome and reason;
/// the `objects` add up to `objects_listed`.
pub fn table(run_id: &str, report: &IngestReport) -> Result<Bytes, parquet::errors::ParquetError> {
    let rows = report.accounting();
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("run_id", Arc::new(rows.iter().map(|_| Some(run_id)).collect::<StringArray>())),
        ("outcome", Arc::new(rows.iter().map(|r| Some(r.outcome)).collect::<StringArray>())),
        ("reason", Arc::new(rows.iter().map(|r| Some(r.reason.as_str())).collect::<StringArray>())),
        ("objects", Arc::new(rows.iter().map(|r| Some(r.objects as i64)).collect::<Int64Array>())),
        (
            "objects_listed",
            Arc::new(
                rows.iter().map(|_| Some(report.objects_listed as i64)).collect::<Int64Array>(),
            ),
        ),
    ];
    let batch = RecordBatch::try_from_iter(columns)?;
    let properties = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
    let mut buffer = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut buffer, batch.schema(), Some(properties))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(Bytes::from(buffer))
}
