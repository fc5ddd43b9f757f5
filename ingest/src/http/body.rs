//! The request body: parsing (JSON or MessagePack, one document shape) and validation.
//!
//! ```json
//! {"readings": [{"device": "d1", "metric": "temp", "ts": 1763762399000000000, "value": 21.5}]}
//! ```
//!
//! Two phases, so that each answer is precise:
//! 1. serde parses into borrowed structs ([`RawReading`]: names borrow from the body). A
//!    syntax error, a wrong type, a missing or unknown field is a 400 `malformed_body`
//!    naming the path (`readings[3].value`) and, for JSON, the line and column. Unknown
//!    fields are refused rather than ignored, so a typo (`valeu`) is not silently dropped.
//!    More than `max_readings_per_request` readings stop the parse (413).
//! 2. every reading is checked with the binding's own rules (`sluice_binding::validate`),
//!    collecting every problem (422 `invalid_reading`, up to 100 listed), so HTTP and the
//!    broker consumers refuse the same readings with the same words. Only a fully valid
//!    request becomes a [`Chunk`]: a request is accepted whole or not at all.
//!
//! `ts` is an integer in the unit of `?precision=` (`ns` default, `us`, `ms`, `s`) or an
//! RFC 3339 string (`2025-11-21T21:59:59.5Z`, any UTC offset). Integral floats are read as
//! integers (JavaScript clients, and integers beyond 64 bits, which JSON parsers turn into
//! floats, then fail the range check); fractional ones are refused.
//!
//! `value` is a number. JSON has no NaN or infinity, so the strings `"NaN"`, `"Infinity"`,
//! `"-Infinity"` (and `inf` spellings, any case) are read as the float they name — and then
//! refused like a MessagePack NaN, with "value is NaN". A JSON number too large for a
//! float64 (`1e400`) is refused as infinite.
//!
//! A `tenant` field, in the document or in a reading, is refused (400 `tenant_in_body`):
//! the tenant is set by the API key, and silently ignoring it would hide a client's belief
//! that it can choose.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_path_to_error::{Segment, Track};
use sluice_binding::validate::{Limits, check_days, check_name, check_timestamp, check_value};

use super::error::{ApiError, ErrorCode, Problems};
use crate::batcher::{Chunk, ChunkBuilder};

/// Deepest nesting accepted in a MessagePack body (the document is 3 levels deep; this only
/// bounds the recursion spent skipping a `tenant` value).
const MSGPACK_MAX_DEPTH: usize = 16;

/// The body's encoding, from `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `application/json`.
    Json,
    /// `application/msgpack` or `application/x-msgpack`.
    MsgPack,
}

impl Format {
    /// The format of a `Content-Type` value (parameters such as `charset` are ignored).
    pub fn from_content_type(value: &str) -> Option<Self> {
        let essence = value.split(';').next().unwrap_or("").trim();
        if essence.eq_ignore_ascii_case("application/json") {
            Some(Format::Json)
        } else if essence.eq_ignore_ascii_case("application/msgpack")
            || essence.eq_ignore_ascii_case("application/x-msgpack")
        {
            Some(Format::MsgPack)
        } else {
            None
        }
    }

    fn name(self) -> &'static str {
        match self {
            Format::Json => "JSON",
            Format::MsgPack => "MessagePack",
        }
    }
}

/// Unit of integer timestamps, from `?precision=`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// Nanoseconds (default).
    #[default]
    Ns,
    /// Microseconds.
    Us,
    /// Milliseconds.
    Ms,
    /// Seconds.
    S,
}

impl Precision {
    /// Reads the query string of a request: only `precision` is known.
    pub fn from_query(query: Option<&str>) -> Result<Self, ApiError> {
        let mut precision = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if key != "precision" {
                return Err(ApiError::new(
                    ErrorCode::InvalidQuery,
                    format!(
                        "unknown query parameter {key:?}; the only one is precision=ns|us|ms|s"
                    ),
                ));
            }
            if precision.is_some() {
                return Err(ApiError::new(
                    ErrorCode::InvalidQuery,
                    "precision is given twice",
                ));
            }
            precision = Some(match value {
                "ns" => Precision::Ns,
                "us" => Precision::Us,
                "ms" => Precision::Ms,
                "s" => Precision::S,
                other => {
                    return Err(ApiError::new(
                        ErrorCode::InvalidQuery,
                        format!("invalid precision {other:?}: expected ns, us, ms or s"),
                    ));
                }
            });
        }
        Ok(precision.unwrap_or_default())
    }

    fn ns_per_unit(self) -> i128 {
        match self {
            Precision::Ns => 1,
            Precision::Us => 1_000,
            Precision::Ms => 1_000_000,
            Precision::S => 1_000_000_000,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Precision::Ns => "ns",
            Precision::Us => "us",
            Precision::Ms => "ms",
            Precision::S => "s",
        }
    }
}

/// What parsing needs to know besides the body.
#[derive(Clone, Copy, Debug)]
pub struct ParseOptions {
    /// Body encoding.
    pub format: Format,
    /// Unit of integer timestamps.
    pub precision: Precision,
    /// Most readings allowed.
    pub max_readings: usize,
    /// Timestamp bounds.
    pub limits: Limits,
    /// The server's clock, ns since the Unix epoch.
    pub now_ns: i64,
}

/// Parses and validates a body into the chunk of readings to batch.
pub fn parse(body: &[u8], opts: &ParseOptions) -> Result<Chunk, ApiError> {
    let too_many = Cell::new(false);
    let seed = DocumentSeed {
        max_readings: opts.max_readings,
        too_many: &too_many,
    };
    let doc = match opts.format {
        Format::Json => parse_json(body, seed),
        Format::MsgPack => parse_msgpack(body, seed),
    }
    .map_err(|e| {
        if too_many.get() {
            ApiError::new(
                ErrorCode::TooManyReadings,
                format!(
                    "the request holds more than {} readings; split it",
                    opts.max_readings
                ),
            )
        } else {
            e.into_api_error(opts.format)
        }
    })?;
    if doc.tenant {
        return Err(tenant_in_body("the document"));
    }
    if let Some(i) = doc.readings.iter().position(|r| r.tenant) {
        return Err(tenant_in_body(&format!("readings[{i}]")));
    }
    if doc.readings.is_empty() {
        return Err(ApiError::new(
            ErrorCode::NoReadings,
            "the readings array is empty; send at least one reading",
        ));
    }
    validate(&doc.readings, opts)
}

fn tenant_in_body(place: &str) -> ApiError {
    ApiError::new(
        ErrorCode::TenantInBody,
        format!(
            "tenant is set by the API key, not by the body: remove the tenant field from {place}"
        ),
    )
}

fn validate(readings: &[RawReading<'_>], opts: &ParseOptions) -> Result<Chunk, ApiError> {
    let mut problems = Problems::default();
    let mut chunk = ChunkBuilder::with_capacity(readings.len());
    for (i, r) in readings.iter().enumerate() {
        let before = problems.total;
        if let Err(p) = check_name("device", &r.device) {
            problems.push(i, "device", || p);
        }
        if let Err(p) = check_name("metric", &r.metric) {
            problems.push(i, "metric", || p);
        }
        let ts = match timestamp_ns(&r.ts, opts) {
            Ok(ts) => ts,
            Err(p) => {
                problems.push(i, "ts", || p);
                0
            }
        };
        if let Err(p) = check_value(r.value.0) {
            problems.push(i, "value", || p);
        }
        // Once anything is wrong, the chunk is never used: stop filling it.
        if before == 0 && problems.is_empty() {
            chunk.push(&r.device, &r.metric, ts, r.value.0);
        }
    }
    if !problems.is_empty() {
        return Err(problems.into_error(readings.len()));
    }
    let chunk = chunk.finish();
    check_days(chunk.timestamps(), &opts.limits)
        .map_err(|e| ApiError::new(ErrorCode::TooManyDays, e))?;
    Ok(chunk)
}

/// A `ts` in ns, checked against the binding's bounds.
fn timestamp_ns(ts: &RawTs<'_>, opts: &ParseOptions) -> Result<i64, String> {
    let ns = match ts {
        RawTs::Int(v) => {
            let p = opts.precision;
            let ns = v
                .checked_mul(p.ns_per_unit())
                .and_then(|ns| i64::try_from(ns).ok())
                .ok_or_else(|| {
                    format!(
                        "timestamp {v} {} is out of range (precision={})",
                        p.as_str(),
                        p.as_str()
                    )
                })?;
            return check_timestamp(ns, opts.now_ns, &opts.limits)
                .map(|()| ns)
                .map_err(|e| {
                    if p == Precision::Ns {
                        e
                    } else {
                        format!("{e}; the request sent {v} with precision={}", p.as_str())
                    }
                });
        }
        RawTs::Text(s) => chrono::DateTime::parse_from_rfc3339(s)
            .map_err(|e| format!("timestamp {s:?} is not an RFC 3339 date-time: {e}"))?
            .timestamp_nanos_opt()
            .ok_or_else(|| format!("timestamp {s:?} is out of range"))?,
    };
    check_timestamp(ns, opts.now_ns, &opts.limits).map(|()| ns)
}

// ---- Phase 1: serde ----

/// A parse failure, with where it happened.
struct ParseFailure {
    /// `None` for failures outside the document (trailing bytes).
    path: Option<serde_path_to_error::Path>,
    message: String,
    /// serde_json reported a number too large for its type.
    out_of_range: bool,
}

impl ParseFailure {
    fn into_api_error(self, format: Format) -> ApiError {
        // A number beyond float64 at `readings[i].value` (or `.ts`): a reading problem.
        if self.out_of_range {
            let segments: Vec<&Segment> = self.path.iter().flat_map(|p| p.iter()).collect();
            if let [
                Segment::Map { key: r },
                Segment::Seq { index },
                Segment::Map { key: field },
            ] = segments.as_slice()
                && r == "readings"
            {
                let (field, problem) = match field.as_str() {
                    "value" => ("value", "value is infinite".to_owned()),
                    "ts" => ("ts", "timestamp is out of range".to_owned()),
                    _ => ("value", String::new()),
                };
                if !problem.is_empty() {
                    let mut problems = Problems::default();
                    problems.push(*index, field, || {
                        format!("{problem} (a number beyond the range of a 64-bit float)")
                    });
                    let mut e = problems.into_error(index + 1);
                    e.message = format!(
                        "readings[{index}].{field}: {}; a request is accepted whole or not at all, so none of its readings was stored (readings after this one were not checked)",
                        self.message
                    );
                    return e;
                }
            }
        }
        let at = self.path.map_or_else(|| ".".to_owned(), |p| p.to_string());
        let message = if at == "." {
            format!("malformed {} body: {}", format.name(), self.message)
        } else {
            format!("malformed {} body at {at}: {}", format.name(), self.message)
        };
        ApiError::new(ErrorCode::MalformedBody, message)
    }
}

fn parse_json<'de>(body: &'de [u8], seed: DocumentSeed<'_>) -> Result<Document<'de>, ParseFailure> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let mut track = Track::new();
    let doc = seed
        .deserialize(serde_path_to_error::Deserializer::new(&mut de, &mut track))
        .map_err(|e| ParseFailure {
            out_of_range: e.to_string().starts_with("number out of range"),
            message: e.to_string(),
            path: Some(track.path()),
        })?;
    de.end().map_err(|e| ParseFailure {
        path: None,
        message: e.to_string(),
        out_of_range: false,
    })?;
    Ok(doc)
}

fn parse_msgpack<'de>(
    body: &'de [u8],
    seed: DocumentSeed<'_>,
) -> Result<Document<'de>, ParseFailure> {
    let mut de = rmp_serde::Deserializer::from_read_ref(body);
    de.set_max_depth(MSGPACK_MAX_DEPTH);
    let mut track = Track::new();
    let doc = seed
        .deserialize(serde_path_to_error::Deserializer::new(&mut de, &mut track))
        .map_err(|e| ParseFailure {
            message: e.to_string(),
            path: Some(track.path()),
            out_of_range: false,
        })?;
    // The borrowing reader does not say where it stopped: measure the first value again
    // with a reader that does, to refuse trailing bytes (a second document would be lost).
    let mut rest: &[u8] = body;
    let mut skip = rmp_serde::Deserializer::new(&mut rest);
    skip.set_max_depth(MSGPACK_MAX_DEPTH);
    IgnoredAny::deserialize(&mut skip).map_err(|e| ParseFailure {
        path: None,
        message: e.to_string(),
        out_of_range: false,
    })?;
    drop(skip);
    if !rest.is_empty() {
        return Err(ParseFailure {
            path: None,
            message: format!(
                "{} trailing bytes after the document (send one document per request)",
                rest.len()
            ),
            out_of_range: false,
        });
    }
    Ok(doc)
}

struct Document<'a> {
    readings: Vec<RawReading<'a>>,
    tenant: bool,
}

/// Deserializes the document, stopping at `max_readings + 1` readings.
struct DocumentSeed<'s> {
    max_readings: usize,
    too_many: &'s Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for DocumentSeed<'_> {
    type Value = Document<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DocumentSeed<'_> {
    type Value = Document<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map with a `readings` array")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut readings = None;
        let mut tenant = false;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "readings" => {
                    if readings.is_some() {
                        return Err(de::Error::duplicate_field("readings"));
                    }
                    readings = Some(map.next_value_seed(ReadingsSeed {
                        max_readings: self.max_readings,
                        too_many: self.too_many,
                    })?);
                }
                "tenant" => {
                    tenant = true;
                    map.next_value::<IgnoredAny>()?;
                }
                other => return Err(de::Error::unknown_field(other, &["readings"])),
            }
        }
        Ok(Document {
            readings: readings.ok_or_else(|| de::Error::missing_field("readings"))?,
            tenant,
        })
    }
}

struct ReadingsSeed<'s> {
    max_readings: usize,
    too_many: &'s Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for ReadingsSeed<'_> {
    type Value = Vec<RawReading<'de>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ReadingsSeed<'_> {
    type Value = Vec<RawReading<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of readings")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // A MessagePack array announces its length: refuse before parsing anything.
        if seq.size_hint().is_some_and(|n| n > self.max_readings) {
            self.too_many.set(true);
            return Err(de::Error::custom("too many readings"));
        }
        let capacity = seq
            .size_hint()
            .unwrap_or(0)
            .min(self.max_readings)
            .min(1 << 16);
        let mut out = Vec::with_capacity(capacity);
        while let Some(r) = seq.next_element::<RawReading<'de>>()? {
            if out.len() == self.max_readings {
                self.too_many.set(true);
                return Err(de::Error::custom("too many readings"));
            }
            out.push(r);
        }
        Ok(out)
    }
}

/// One reading as sent, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReading<'a> {
    #[serde(borrow)]
    device: Cow<'a, str>,
    #[serde(borrow)]
    metric: Cow<'a, str>,
    #[serde(borrow)]
    ts: RawTs<'a>,
    value: RawValue,
    /// Present (with any value, even null) → refused.
    #[serde(default, deserialize_with = "present")]
    tenant: bool,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    IgnoredAny::deserialize(d)?;
    Ok(true)
}

/// A timestamp as sent: an integer in the request's precision, or RFC 3339 text.
#[derive(Debug)]
enum RawTs<'a> {
    Int(i128),
    Text(Cow<'a, str>),
}

const TS_EXPECTED: &str =
    "an integer timestamp (in the unit of ?precision=, default ns) or an RFC 3339 string";

impl<'de: 'a, 'a> Deserialize<'de> for RawTs<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawTs<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(TS_EXPECTED)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(RawTs::Int(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(RawTs::Int(v.into()))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Self::Value, E> {
                Ok(RawTs::Int(v))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Self::Value, E> {
                Ok(RawTs::Int(i128::try_from(v).unwrap_or(i128::MAX)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                if v.is_finite() && v.fract() == 0.0 {
                    // Saturating: anything beyond i128 fails the range check anyway.
                    Ok(RawTs::Int(v as i128))
                } else {
                    Err(E::invalid_value(de::Unexpected::Float(v), &self))
                }
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(RawTs::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(RawTs::Text(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_any(V)
    }
}

/// A value as sent: any number, or a string naming NaN or an infinity.
#[derive(Debug)]
struct RawValue(f64);

impl<'de> Deserialize<'de> for RawValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(RawValue(v))
            }
            fn visit_f32<E: de::Error>(self, v: f32) -> Result<Self::Value, E> {
                Ok(RawValue(v.into()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(RawValue(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(RawValue(v as f64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                non_finite(v)
                    .map(RawValue)
                    .ok_or_else(|| E::invalid_type(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// The float named by `NaN`, `Infinity`, `-Infinity`, `inf`, … (any case).
fn non_finite(s: &str) -> Option<f64> {
    let (negative, name) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let v = if name.eq_ignore_ascii_case("nan") {
        f64::NAN
    } else if name.eq_ignore_ascii_case("inf") || name.eq_ignore_ascii_case("infinity") {
        f64::INFINITY
    } else {
        return None;
    };
    Some(if negative { -v } else { v })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::error::Detail;
    use serde::Serialize;

    /// 2025-11-21T22:00:00Z
    const NOW: i64 = 1_763_762_400_000_000_000;
    const TS: i64 = 1_763_762_399_000_000_000;

    fn opts(format: Format) -> ParseOptions {
        ParseOptions {
            format,
            precision: Precision::Ns,
            max_readings: 5,
            limits: Limits::default(),
            now_ns: NOW,
        }
    }

    fn json(body: &str) -> Result<Chunk, ApiError> {
        parse(body.as_bytes(), &opts(Format::Json))
    }

    fn json_with(body: &str, precision: Precision) -> Result<Chunk, ApiError> {
        parse(
            body.as_bytes(),
            &ParseOptions {
                precision,
                ..opts(Format::Json)
            },
        )
    }

    fn err(r: Result<Chunk, ApiError>) -> ApiError {
        r.expect_err("must be refused")
    }

    fn one(ts: &str, value: &str) -> String {
        format!(r#"{{"readings":[{{"device":"d1","metric":"temp","ts":{ts},"value":{value}}}]}}"#)
    }

    fn expected(readings: &[(&str, &str, i64, f64)]) -> Chunk {
        let mut b = ChunkBuilder::default();
        for (d, m, t, x) in readings {
            b.push(d, m, *t, *x);
        }
        b.finish()
    }

    #[test]
    fn parses_json() {
        let chunk = json(&format!(
            r#"{{"readings": [
                {{"device": "d1", "metric": "temp", "ts": {TS}, "value": 21.5}},
                {{"value": -3, "ts": "2025-11-21T21:59:59.5Z", "metric": "hum", "device": "d\u00e9"}}
            ]}}"#
        ))
        .unwrap();
        assert_eq!(
            chunk,
            expected(&[
                ("d1", "temp", TS, 21.5),
                ("dé", "hum", TS + 500_000_000, -3.0)
            ])
        );
    }

    #[derive(Serialize)]
    struct MpReading<'a, T: Serialize, V: Serialize> {
        device: &'a str,
        metric: &'a str,
        ts: T,
        value: V,
    }

    #[derive(Serialize)]
    struct MpDoc<R: Serialize> {
        readings: Vec<R>,
    }

    fn msgpack<R: Serialize>(readings: Vec<R>) -> Vec<u8> {
        rmp_serde::to_vec_named(&MpDoc { readings }).unwrap()
    }

    #[test]
    fn parses_msgpack_with_the_same_shape() {
        let body = msgpack(vec![
            MpReading {
                device: "d1",
                metric: "temp",
                ts: TS,
                value: 21.5,
            },
            MpReading {
                device: "d1",
                metric: "temp",
                ts: TS + 1,
                value: 7.0,
            },
        ]);
        let chunk = parse(&body, &opts(Format::MsgPack)).unwrap();
        assert_eq!(
            chunk,
            expected(&[("d1", "temp", TS, 21.5), ("d1", "temp", TS + 1, 7.0)])
        );
        // Integer and float32 values, RFC 3339 timestamps.
        let body = msgpack(vec![MpReading {
            device: "d1",
            metric: "temp",
            ts: "2025-11-21T23:59:59+02:00",
            value: 3u8,
        }]);
        let chunk = parse(&body, &opts(Format::MsgPack)).unwrap();
        assert_eq!(chunk, expected(&[("d1", "temp", TS, 3.0)]));
        let body = msgpack(vec![MpReading {
            device: "d1",
            metric: "temp",
            ts: TS,
            value: 1.5f32,
        }]);
        assert_eq!(
            parse(&body, &opts(Format::MsgPack)).unwrap(),
            expected(&[("d1", "temp", TS, 1.5)])
        );
    }

    #[test]
    fn msgpack_nan_and_infinity_are_invalid_readings() {
        let body = msgpack(vec![
            MpReading {
                device: "d1",
                metric: "temp",
                ts: TS,
                value: f64::NAN,
            },
            MpReading {
                device: "d1",
                metric: "temp",
                ts: TS,
                value: f64::NEG_INFINITY,
            },
        ]);
        let e = err(parse(&body, &opts(Format::MsgPack)));
        assert_eq!(e.code, ErrorCode::InvalidReading);
        assert_eq!(e.status().as_u16(), 422);
        assert_eq!(
            e.details,
            [
                Detail {
                    index: 0,
                    field: "value",
                    problem: "value is NaN".into()
                },
                Detail {
                    index: 1,
                    field: "value",
                    problem: "value is infinite".into()
                }
            ]
        );
    }

    #[test]
    fn msgpack_malformed_and_trailing_bytes() {
        let e = err(parse(b"\xc1garbage", &opts(Format::MsgPack)));
        assert_eq!(e.code, ErrorCode::MalformedBody);
        assert!(
            e.message.starts_with("malformed MessagePack body"),
            "{}",
            e.message
        );
        let mut body = msgpack(vec![MpReading {
            device: "d1",
            metric: "temp",
            ts: TS,
            value: 1.0,
        }]);
        body.extend_from_slice(&body.clone());
        let e = err(parse(&body, &opts(Format::MsgPack)));
        assert_eq!(e.code, ErrorCode::MalformedBody);
        assert!(e.message.contains("trailing bytes"), "{}", e.message);
        // Wrong type, named by its path.
        let body = msgpack(vec![MpReading {
            device: "d1",
            metric: "temp",
            ts: TS,
            value: true,
        }]);
        let e = err(parse(&body, &opts(Format::MsgPack)));
        assert_eq!(e.code, ErrorCode::MalformedBody);
        assert!(e.message.contains("readings[0].value"), "{}", e.message);
        // Deep nesting is refused, not a stack overflow.
        let mut deep = vec![0x81, 0xa6];
        deep.extend_from_slice(b"tenant");
        deep.extend(std::iter::repeat_n(0x91, 100_000));
        deep.push(0xc0);
        let e = err(parse(&deep, &opts(Format::MsgPack)));
        assert_eq!(e.code, ErrorCode::MalformedBody);
        assert!(e.message.contains("depth"), "{}", e.message);
        // An announced array longer than the limit is refused before parsing it.
        let body = [
            0x81, 0xa8, b'r', b'e', b'a', b'd', b'i', b'n', b'g', b's', 0xdd, 0xff, 0xff, 0xff,
            0xff,
        ];
        assert_eq!(
            err(parse(&body, &opts(Format::MsgPack))).code,
            ErrorCode::TooManyReadings
        );
    }

    #[test]
    fn json_syntax_errors_carry_line_and_column() {
        let e = err(json("{\"readings\": [\n  {\"device\": \"d1\",,}\n]}"));
        assert_eq!(e.code, ErrorCode::MalformedBody);
        assert_eq!(e.status().as_u16(), 400);
        assert!(e.message.contains("line 2 column"), "{}", e.message);
        let e = err(json(""));
        assert!(e.message.contains("EOF"), "{}", e.message);
        let e = err(json(&format!("{} []", one(&TS.to_string(), "1"))));
        assert!(e.message.contains("trailing characters"), "{}", e.message);
        let e = err(json("[1, 2]"));
        assert!(
            e.message.contains("expected a map with a `readings` array"),
            "{}",
            e.message
        );
    }

    #[test]
    fn wrong_types_name_the_field() {
        let e = err(json(&one(&TS.to_string(), "\"warm\"")));
        assert_eq!(e.code, ErrorCode::MalformedBody);
        assert!(e.message.contains("at readings[0].value"), "{}", e.message);
        assert!(e.message.contains("expected a number"), "{}", e.message);
        let e = err(json(&one("true", "1")));
        assert!(e.message.contains("at readings[0].ts"), "{}", e.message);
        assert!(e.message.contains("RFC 3339"), "{}", e.message);
        let e = err(json(&one("1.5", "1")));
        assert!(
            e.message
                .contains("readings[0].ts: invalid value: floating point `1.5`"),
            "{}",
            e.message
        );
        let e = err(json(
            r#"{"readings":[{"device":7,"metric":"m","ts":1,"value":1}]}"#,
        ));
        assert!(e.message.contains("readings[0].device"), "{}", e.message);
        let e = err(json(r#"{"readings":{}}"#));
        assert!(e.message.contains("at readings"), "{}", e.message);
    }

    #[test]
    fn missing_and_unknown_fields() {
        let e = err(json(r#"{"readings":[{"device":"d","metric":"m","ts":1}]}"#));
        assert_eq!(e.code, ErrorCode::MalformedBody);
        assert!(e.message.contains("missing field `value`"), "{}", e.message);
        assert!(e.message.contains("readings[0]"), "{}", e.message);
        let e = err(json("{}"));
        assert!(
            e.message.contains("missing field `readings`"),
            "{}",
            e.message
        );
        let e = err(json(&format!(
            r#"{{"readings":[{{"device":"d","metric":"m","ts":{TS},"valeu":1,"value":1}}]}}"#
        )));
        assert!(e.message.contains("unknown field `valeu`"), "{}", e.message);
        let e = err(json(r#"{"readings":[],"extra":1}"#));
        assert!(e.message.contains("unknown field `extra`"), "{}", e.message);
        let e = err(json(r#"{"readings":[],"readings":[]}"#));
        assert!(
            e.message.contains("duplicate field `readings`"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_tenant_in_the_body_is_refused() {
        let e = err(json(&format!(
            r#"{{"tenant":"other","readings":[{{"device":"d","metric":"m","ts":{TS},"value":1}}]}}"#
        )));
        assert_eq!(e.code, ErrorCode::TenantInBody);
        assert_eq!(e.status().as_u16(), 400);
        assert!(
            e.message.starts_with("tenant is set by the API key"),
            "{}",
            e.message
        );
        let e = err(json(&format!(
            r#"{{"readings":[{{"device":"d","metric":"m","ts":{TS},"value":1}},{{"device":"d","metric":"m","ts":{TS},"value":1,"tenant":null}}]}}"#
        )));
        assert_eq!(e.code, ErrorCode::TenantInBody);
        assert!(e.message.contains("readings[1]"), "{}", e.message);
    }

    #[test]
    fn nan_and_infinity_spelled_as_strings_or_overflowing() {
        for (v, problem) in [
            ("\"NaN\"", "value is NaN"),
            ("\"nan\"", "value is NaN"),
            ("\"Infinity\"", "value is infinite"),
            ("\"-inf\"", "value is infinite"),
        ] {
            let e = err(json(&one(&TS.to_string(), v)));
            assert_eq!(e.code, ErrorCode::InvalidReading, "{v}");
            assert_eq!(e.details[0].problem, problem, "{v}");
            assert_eq!(e.details[0].field, "value");
        }
        for v in ["1e400", "-1e400"] {
            let e = err(json(&one(&TS.to_string(), v)));
            assert_eq!(e.code, ErrorCode::InvalidReading, "{v}: {}", e.message);
            assert_eq!(e.details[0].index, 0);
            assert_eq!(e.details[0].field, "value");
            assert!(
                e.details[0].problem.starts_with("value is infinite"),
                "{:?}",
                e.details
            );
        }
    }

    #[test]
    fn every_problem_is_listed_with_its_index() {
        let body = format!(
            r#"{{"readings":[
            {{"device":"ok","metric":"m","ts":{TS},"value":1}},
            {{"device":"","metric":"m","ts":{TS},"value":"NaN"}},
            {{"device":"d","metric":"m\u0007","ts":1000,"value":1}},
            {{"device":"d","metric":"m","ts":"yesterday","value":1}}
            ]}}"#
        );
        let e = err(json(&body));
        assert_eq!(e.code, ErrorCode::InvalidReading);
        assert_eq!(e.details_total, 5);
        let got: Vec<(usize, &str)> = e.details.iter().map(|d| (d.index, d.field)).collect();
        assert_eq!(
            got,
            [
                (1, "device"),
                (1, "value"),
                (2, "metric"),
                (2, "ts"),
                (3, "ts")
            ]
        );
        assert_eq!(e.details[0].problem, "device name is empty");
        assert!(
            e.details[3].problem.contains("before 2000-01-01"),
            "{:?}",
            e.details[3]
        );
        assert!(
            e.details[4].problem.contains("not an RFC 3339"),
            "{:?}",
            e.details[4]
        );
        assert!(
            e.message.starts_with("5 problems in 4 readings"),
            "{}",
            e.message
        );
    }

    #[test]
    fn details_are_capped_at_100_with_a_total() {
        let reading = r#"{"device":"d","metric":"m","ts":1,"value":"NaN"}"#;
        let body = format!(r#"{{"readings":[{}]}}"#, vec![reading; 150].join(","));
        let e = err(parse(
            body.as_bytes(),
            &ParseOptions {
                max_readings: 1000,
                ..opts(Format::Json)
            },
        ));
        assert_eq!(e.details.len(), 100);
        assert_eq!(e.details_total, 300);
        assert!(
            e.message.contains("the first 100 are listed"),
            "{}",
            e.message
        );
    }

    #[test]
    fn out_of_range_timestamps() {
        let hour = 3_600_000_000_000i64;
        let e = err(json(&one(&(NOW + 2 * hour).to_string(), "1")));
        assert_eq!(e.code, ErrorCode::InvalidReading);
        assert!(
            e.details[0].problem.contains("in the future"),
            "{:?}",
            e.details
        );
        let e = err(json(&one("-5", "1")));
        assert!(
            e.details[0].problem.contains("before 2000"),
            "{:?}",
            e.details
        );
        // Beyond i64 ns, beyond u64, beyond f64.
        for ts in [
            "9223372036854775808",
            "99999999999999999999999",
            "1e300",
            "\"9999-12-31T00:00:00Z\"",
        ] {
            let e = err(json(&one(ts, "1")));
            assert_eq!(e.code, ErrorCode::InvalidReading, "{ts}: {}", e.message);
            assert_eq!(e.details[0].field, "ts");
            assert!(
                e.details[0].problem.contains("out of range"),
                "{ts}: {:?}",
                e.details
            );
        }
        let e = err(json(&one("1e400", "1")));
        assert_eq!(e.code, ErrorCode::InvalidReading, "{}", e.message);
        assert_eq!(e.details[0].field, "ts");
    }

    #[test]
    fn precision_scales_integer_timestamps() {
        let secs = TS / 1_000_000_000;
        for (p, ts) in [
            (Precision::Ns, TS),
            (Precision::Us, TS / 1_000),
            (Precision::Ms, TS / 1_000_000),
            (Precision::S, secs),
        ] {
            let chunk = json_with(&one(&ts.to_string(), "1"), p).unwrap();
            assert_eq!(chunk, expected(&[("d1", "temp", TS, 1.0)]), "{p:?}");
        }
        // RFC 3339 text ignores the precision.
        let chunk = json_with(&one("\"2025-11-21T21:59:59Z\"", "1"), Precision::S).unwrap();
        assert_eq!(chunk, expected(&[("d1", "temp", TS, 1.0)]));
        // Seconds sent as ns: the message says what went wrong.
        let e = err(json(&one(&secs.to_string(), "1")));
        assert!(
            e.details[0].problem.contains("before 2000"),
            "{:?}",
            e.details
        );
        // ns sent with precision=s overflows.
        let e = err(json_with(&one(&TS.to_string(), "1"), Precision::S));
        assert!(
            e.details[0].problem.contains("out of range (precision=s)"),
            "{:?}",
            e.details
        );
        // 1 s is before 2000: the binding's words, plus what was sent.
        let e = err(json_with(&one("1", "1"), Precision::S));
        assert!(
            e.details[0]
                .problem
                .contains("the request sent 1 with precision=s"),
            "{:?}",
            e.details
        );
        // Integral floats are integers.
        let chunk = json_with(&one(&format!("{secs}.0"), "1"), Precision::S).unwrap();
        assert_eq!(chunk, expected(&[("d1", "temp", TS, 1.0)]));
    }

    #[test]
    fn query_strings() {
        assert_eq!(Precision::from_query(None).unwrap(), Precision::Ns);
        assert_eq!(Precision::from_query(Some("")).unwrap(), Precision::Ns);
        assert_eq!(
            Precision::from_query(Some("precision=ms")).unwrap(),
            Precision::Ms
        );
        assert_eq!(
            Precision::from_query(Some("precision=s&")).unwrap(),
            Precision::S
        );
        for bad in [
            "precision=h",
            "precision",
            "db=x",
            "precision=s&precision=s",
        ] {
            let e = Precision::from_query(Some(bad)).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidQuery, "{bad}");
        }
    }

    #[test]
    fn content_types() {
        assert_eq!(
            Format::from_content_type("application/json"),
            Some(Format::Json)
        );
        assert_eq!(
            Format::from_content_type("Application/JSON; charset=utf-8"),
            Some(Format::Json)
        );
        assert_eq!(
            Format::from_content_type("application/msgpack"),
            Some(Format::MsgPack)
        );
        assert_eq!(
            Format::from_content_type("application/x-msgpack"),
            Some(Format::MsgPack)
        );
        assert_eq!(Format::from_content_type("text/plain"), None);
        assert_eq!(Format::from_content_type(""), None);
    }

    #[test]
    fn empty_and_too_many_readings() {
        let e = err(json(r#"{"readings":[]}"#));
        assert_eq!(e.code, ErrorCode::NoReadings);
        assert_eq!(e.status().as_u16(), 422);
        let reading = format!(r#"{{"device":"d","metric":"m","ts":{TS},"value":1}}"#);
        let five = format!(r#"{{"readings":[{}]}}"#, [reading.as_str(); 5].join(","));
        assert_eq!(json(&five).unwrap().len(), 5);
        let six = format!(r#"{{"readings":[{}]}}"#, [reading.as_str(); 6].join(","));
        let e = err(json(&six));
        assert_eq!(e.code, ErrorCode::TooManyReadings);
        assert_eq!(e.status().as_u16(), 413);
        assert!(e.message.contains("more than 5 readings"), "{}", e.message);
    }

    #[test]
    fn json_strings_borrow_from_the_body_unless_escaped() {
        let body = format!(
            r#"{{"readings":[{{"device":"plain","metric":"esc\u0041","ts":{TS},"value":1}}]}}"#
        );
        let mut de = serde_json::Deserializer::from_str(&body);
        let too_many = Cell::new(false);
        let doc = DocumentSeed {
            max_readings: 10,
            too_many: &too_many,
        }
        .deserialize(&mut de)
        .unwrap();
        assert!(matches!(doc.readings[0].device, Cow::Borrowed("plain")));
        assert!(matches!(&doc.readings[0].metric, Cow::Owned(m) if m == "escA"));
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // A cheap deterministic fuzz: prefixes and byte flips of valid bodies.
        let valid_json = one(&TS.to_string(), "1.5").into_bytes();
        let valid_mp = msgpack(vec![MpReading {
            device: "d1",
            metric: "temp",
            ts: TS,
            value: 1.5,
        }]);
        for (format, valid) in [(Format::Json, &valid_json), (Format::MsgPack, &valid_mp)] {
            for cut in 0..valid.len() {
                let _ = parse(&valid[..cut], &opts(format));
            }
            for i in 0..valid.len() {
                for b in [0x00, 0x7f, 0x80, 0xc1, 0xdd, 0xff, b'"', b'{'] {
                    let mut v = valid.clone();
                    v[i] = b;
                    let _ = parse(&v, &opts(format));
                }
            }
        }
    }
}
