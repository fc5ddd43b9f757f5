//! The CPU work on one delivery, run on the worker threads: decode the batch (borrowing
//! strings from the body), check the binding's rules, and build the Arrow record batch the
//! sinks take. Arrow's dictionary arrays take the batch's dictionaries and index columns
//! as they are, so there is no per-reading string work.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, DictionaryArray, Float64Array, Int32Array, StringArray, TimestampNanosecondArray,
};
use arrow::datatypes::Int32Type;
use arrow::record_batch::RecordBatch;
use sluice_binding::codec;
use sluice_binding::dead_letter::{DeadLetterKind, Refusal};
use sluice_binding::model::BatchView;
use sluice_binding::validate::{self, DaySet, Limits};
use sluice_sinks::{StagedBatch, TS_TIMEZONE, readings_schema};

/// Decodes, validates and converts one message body; the batch and the UTC days its
/// readings fall on (the partitions a commit of it touches).
pub fn stage(
    body: &[u8],
    redelivered: bool,
    now_ns: i64,
    limits: &Limits,
) -> Result<(StagedBatch, DaySet), Refusal> {
    let view = codec::decode(body)?;
    let days = validate::validate(&view, now_ns, limits)?;
    let rows = to_record_batch(&view).map_err(|e| {
        Refusal::new(
            DeadLetterKind::Invalid,
            format!("cannot build Arrow batch: {e}"),
        )
    })?;
    let batch = StagedBatch {
        tenant: view.tenant.to_owned(),
        batch_id: view.id,
        maybe_duplicate: redelivered,
        rows,
    };
    Ok((batch, days))
}

/// Builds the readings record batch of a validated batch.
pub fn to_record_batch(view: &BatchView<'_>) -> Result<RecordBatch, arrow::error::ArrowError> {
    // Indices were checked against the dictionary sizes, which are far below i32::MAX.
    let dict = |keys: &[u32], names: &[&str]| -> Result<ArrayRef, arrow::error::ArrowError> {
        let keys = Int32Array::from_iter_values(keys.iter().map(|k| *k as i32));
        let values: ArrayRef = Arc::new(StringArray::from_iter_values(names.iter()));
        Ok(Arc::new(DictionaryArray::<Int32Type>::try_new(
            keys, values,
        )?))
    };
    let columns: Vec<ArrayRef> = vec![
        dict(&view.d, &view.devices)?,
        dict(&view.m, &view.metrics)?,
        Arc::new(TimestampNanosecondArray::from(view.t.clone()).with_timezone(TS_TIMEZONE)),
        Arc::new(Float64Array::from(view.x.clone())),
    ];
    RecordBatch::try_new(readings_schema(), columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;
    use sluice_binding::model::{BatchBuilder, now_ns};

    #[test]
    fn stages_a_valid_batch() {
        let now = now_ns();
        let mut b = BatchBuilder::new("acme", "p", 0);
        b.push("d1", "temp", now - 10, 1.5);
        b.push("d2", "temp", now - 5, 2.5);
        b.push("d1", "hum", now, 3.5);
        let batch = b.finish(now);
        let body = codec::encode(&batch).unwrap();
        let (staged, days) = stage(&body, true, now, &Limits::default()).unwrap();
        assert_eq!(days.len(), 1);
        assert_eq!(staged.tenant, "acme");
        assert_eq!(staged.batch_id, batch.id);
        assert!(staged.maybe_duplicate);
        assert_eq!(staged.rows.num_rows(), 3);
        let device = staged.rows.column(0).as_dictionary::<Int32Type>();
        let names = device.values().as_string::<i32>();
        let got: Vec<&str> = device
            .keys()
            .iter()
            .map(|k| names.value(k.unwrap() as usize))
            .collect();
        assert_eq!(got, ["d1", "d2", "d1"]);
        let ts = staged
            .rows
            .column(2)
            .as_primitive::<arrow::datatypes::TimestampNanosecondType>();
        assert_eq!(ts.value(2), now);
        assert_eq!(
            staged
                .rows
                .column(3)
                .as_primitive::<arrow::datatypes::Float64Type>()
                .value(1),
            2.5
        );
    }

    #[test]
    fn refuses_with_kinds() {
        let now = now_ns();
        let r = stage(b"garbage", false, now, &Limits::default()).unwrap_err();
        assert_eq!(r.kind, DeadLetterKind::Decode);
        let mut b = BatchBuilder::new("acme", "p", 0);
        b.push("d1", "temp", now, f64::NAN);
        let body = codec::encode(&b.finish(now)).unwrap();
        let r = stage(&body, false, now, &Limits::default()).unwrap_err();
        assert_eq!(r.kind, DeadLetterKind::Invalid);
        assert!(r.reason.contains("NaN"), "{}", r.reason);
        // A backfill over nine days in one batch (a direct publisher's): refused whole.
        let mut b = BatchBuilder::new("acme", "p", 0);
        for day in 0..9 {
            b.push(
                "d1",
                "temp",
                now - day * sluice_binding::validate::NS_PER_DAY,
                1.0,
            );
        }
        let body = codec::encode(&b.finish(now)).unwrap();
        let r = stage(&body, false, now, &Limits::default()).unwrap_err();
        assert_eq!(r.kind, DeadLetterKind::Invalid);
        assert!(r.reason.contains("more than 8 UTC days"), "{}", r.reason);
    }
}
