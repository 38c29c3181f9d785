//! Logging in the old worker's line format, on stdout and in a file under LOG_FILE_PATH that
//! rolls over daily and by size (`worker.YYYY-MM-DD.log`, `worker.YYYY-MM-DD.1.log`, ...;
//! seven files kept):
//!
//! `2025-01-15 10:30:45,123 - worker - INFO - [worker-1] - Message delivered message_id=...`
//!
//! or, with `LOG_FORMAT=json`, one JSON object per line with the same content, every field its
//! own key (`LogFormat`):
//!
//! `{"ts":"2025-01-15T09:30:45.123Z","level":"INFO","worker_id":"worker-1","message":"Message delivered","message_id":"..."}`

use std::fmt::{self, Write as _};
use std::io::{BufWriter, Write};
use std::path::Path;

use chrono::{Datelike, Timelike};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

mod repeats;

pub use self::repeats::{panic_text, Due, Repeat, Repeats, Summary};
pub use crate::config::LogFormat;

/// Keeps the background log writer running; drop it last, when the process exits.
pub struct LogGuards(#[allow(dead_code)] WorkerGuard);

/// The Python worker's line format: time, logger name, level (Python's names), worker id,
/// message, then the event's fields as `key=value`. Or, for `LogFormat::Json`, the same as
/// one JSON object.
pub struct LineFormat {
    worker_id: String,
    /// The worker id already encoded as a JSON string.
    worker_id_json: String,
    format: LogFormat,
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let level = match *event.metadata().level() {
            Level::ERROR => "ERROR",
            Level::WARN => "WARNING",
            Level::INFO => "INFO",
            Level::DEBUG => "DEBUG",
            Level::TRACE => "TRACE",
        };
        if self.format == LogFormat::Json {
            return self.format_json(level, &mut writer, event);
        }
        // Written field by field: chrono's `format` interprets its pattern on every call.
        let now = chrono::Local::now();
        let mut fields = Fields::default();
        event.record(&mut fields);
        writeln!(
            writer,
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02},{:03} - worker - {level} - [{}] - {}{}",
            now.year(),
            now.month(),
            now.day(),
            now.hour(),
            now.minute(),
            now.second(),
            now.timestamp_subsec_millis().min(999),
            self.worker_id,
            fields.message,
            fields.rest
        )
    }
}

impl LineFormat {
    /// One event as one JSON object on one line.
    fn format_json(&self, level: &str, writer: &mut Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let now = chrono::Utc::now();
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        let mut message = String::with_capacity(fields.message.len() + 2);
        json_string_into(&mut message, &fields.message);
        writeln!(
            writer,
            "{{\"ts\":\"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z\",\"level\":\"{level}\",\
             \"worker_id\":{},\"message\":{}{}}}",
            now.year(),
            now.month(),
            now.day(),
            now.hour(),
            now.minute(),
            now.second(),
            now.timestamp_subsec_millis().min(999),
            self.worker_id_json,
            message,
            fields.rest
        )
    }
}

/// An event's fields as JSON members: `rest` holds `,"key":value` for each field but the
/// message.
#[derive(Default)]
struct JsonFields {
    message: String,
    rest: String,
}

impl JsonFields {
    /// Starts the member `key`: `,"key":`.
    fn key(&mut self, field: &Field) {
        self.rest.push(',');
        json_string_into(&mut self.rest, field.name());
        self.rest.push(':');
    }
}

impl Visit for JsonFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.key(field);
            json_string_into(&mut self.rest, value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        self.rest.push_str(itoa::Buffer::new().format(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        self.rest.push_str(itoa::Buffer::new().format(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.key(field);
            let _ = write!(self.rest, "{value}");
        } else {
            // JSON has no NaN or infinity.
            self.record_str(field, &value.to_string());
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.rest.push_str(if value { "true" } else { "false" });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            // Display-formatted fields (`%x`) arrive here too.
            self.record_str(field, &format!("{value:?}"));
        }
    }
}

/// `value` as a JSON string, quotes included: `"` and `\\` escaped, control characters as
/// `\n`, `\t`, ... or `\u00XX`.
fn json_string_into(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

impl LineFormat {
    /// The format of `worker_id`'s lines.
    pub fn new(worker_id: &str, format: LogFormat) -> LineFormat {
        let mut worker_id_json = String::new();
        json_string_into(&mut worker_id_json, worker_id);
        LineFormat {
            worker_id: worker_id.to_string(),
            worker_id_json,
            format,
        }
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else if value.contains(char::is_whitespace) || value.is_empty() {
            let _ = write!(self.rest, " {}=\"", field.name());
            quote_into(&mut self.rest, value);
            self.rest.push('"');
        } else {
            let _ = write!(self.rest, " {}={value}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            // Display-formatted fields (`%x`) arrive here too; quote them when they have spaces.
            self.record_str(field, &format!("{value:?}"));
        }
    }
}

/// `value` with `\\`, `"` and control characters escaped, as Rust's `{:?}` would write them,
/// but without its per-character Unicode checks.
fn quote_into(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.extend(c.escape_debug()),
            c => out.push(c),
        }
    }
}

/// Starts logging at `level` in `format` to stdout and to files in `dir` that roll over daily
/// and at `max_file_bytes`, seven kept. Dependencies log at WARNING and above only, so a DEBUG
/// run shows courier's own lines.
pub fn init(
    level: Level,
    format: LogFormat,
    dir: &Path,
    max_file_bytes: u64,
    worker_id: &str,
) -> Result<LogGuards, LogError> {
    let file = RollingFile::open(dir, max_file_bytes, KEEP_FILES).map_err(|source| LogError::Directory {
        dir: dir.to_path_buf(),
        source,
    })?;
    // One line is formatted once and handed to one background thread, which writes it to
    // both places: at thousands of retry lines a second, a second formatter and a second
    // thread to wake cost the worker measurably.
    let (writer, guard) = tracing_appender::non_blocking(Tee {
        stdout: BufWriter::new(std::io::stdout()),
        file,
    });
    let filter = Targets::new()
        .with_default(LevelFilter::from_level(level).min(LevelFilter::WARN))
        .with_target("courier", level);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .event_format(LineFormat::new(worker_id, format))
                .with_writer(writer)
                .with_filter(filter),
        )
        .try_init()?;
    Ok(LogGuards(guard))
}

/// Why logging could not start.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("logging.file_path (LOG_FILE_PATH) = {}: cannot write logs there", dir.display())]
    Directory {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("logging could not start")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// An error and its causes on one line, `a: b: c`, each cause once (redis-rs and io errors
/// repeat theirs). Where an error reaches a person: a log line, a status update, the exit.
pub fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// Log files kept: the one being written and the six before it.
pub const KEEP_FILES: usize = 7;

/// The log file: `worker.YYYY-MM-DD.log` (UTC date), then `worker.YYYY-MM-DD.1.log`, `.2.log`
/// ... when a day's file reaches its size limit. Each new file removes the oldest beyond
/// `keep`, so the directory never holds more than `keep` files of at most `max_bytes` (plus
/// one line) each. Only whole lines are written to a file.
pub struct RollingFile {
    dir: std::path::PathBuf,
    max_bytes: u64,
    keep: usize,
    file: BufWriter<std::fs::File>,
    date: chrono::NaiveDate,
    index: u32,
    written: u64,
}

impl RollingFile {
    /// Opens (or goes on with) today's newest file in `dir`, creating the directory.
    pub fn open(dir: &Path, max_bytes: u64, keep: usize) -> std::io::Result<RollingFile> {
        std::fs::create_dir_all(dir)?;
        let date = chrono::Utc::now().date_naive();
        let index = log_files(dir)?
            .into_iter()
            .filter(|(d, _, _)| *d == date)
            .map(|(_, i, _)| i)
            .max()
            .unwrap_or(0);
        let (file, written) = Self::append(dir, date, index)?;
        let rolling = RollingFile {
            dir: dir.to_path_buf(),
            max_bytes: max_bytes.max(1),
            keep: keep.max(1),
            file,
            date,
            index,
            written,
        };
        rolling.prune();
        Ok(rolling)
    }

    fn append(dir: &Path, date: chrono::NaiveDate, index: u32) -> std::io::Result<(BufWriter<std::fs::File>, u64)> {
        let path = dir.join(log_file_name(date, index));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata()?.len();
        Ok((BufWriter::new(file), written))
    }

    /// Starts the next file when the day changed or `incoming` would take this one past its
    /// limit (a file with nothing in it takes any line).
    fn roll_if_due(&mut self, incoming: usize) -> std::io::Result<()> {
        let today = chrono::Utc::now().date_naive();
        let incoming = u64::try_from(incoming).unwrap_or(u64::MAX);
        let full = self.written > 0 && self.written.saturating_add(incoming) > self.max_bytes;
        if today == self.date && !full {
            return Ok(());
        }
        self.file.flush()?;
        let index = if today == self.date {
            self.index.saturating_add(1)
        } else {
            0
        };
        let (file, written) = Self::append(&self.dir, today, index)?;
        (self.file, self.date, self.index, self.written) = (file, today, index, written);
        self.prune();
        Ok(())
    }

    /// Removes the oldest log files beyond `keep`. Other files are never touched.
    fn prune(&self) {
        let Ok(mut files) = log_files(&self.dir) else {
            return;
        };
        files.sort();
        let excess = files.len().saturating_sub(self.keep);
        for (_, _, path) in files.into_iter().take(excess) {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Write for RollingFile {
    fn write(&mut self, lines: &[u8]) -> std::io::Result<usize> {
        self.roll_if_due(lines.len())?;
        self.file.write_all(lines)?;
        self.written = self
            .written
            .saturating_add(u64::try_from(lines.len()).unwrap_or(u64::MAX));
        Ok(lines.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

fn log_file_name(date: chrono::NaiveDate, index: u32) -> String {
    match index {
        0 => format!("worker.{date}.log"),
        n => format!("worker.{date}.{n}.log"),
    }
}

/// courier's log files in `dir`, as (date, index, path).
fn log_files(dir: &Path) -> std::io::Result<Vec<(chrono::NaiveDate, u32, std::path::PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(middle) = name.strip_prefix("worker.").and_then(|n| n.strip_suffix(".log")) else {
            continue;
        };
        let (date, index) = match middle.split_once('.') {
            Some((date, index)) => (date, index.parse::<u32>().ok()),
            None => (middle, Some(0)),
        };
        if let (Ok(date), Some(index)) = (chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d"), index) {
            found.push((date, index, path));
        }
    }
    Ok(found)
}

/// Writes each line to stdout and to the log file. A closed stdout (nothing reading it) does
/// not stop the file, which is the record that matters. Both are buffered: the background
/// thread flushes as soon as it has written every line waiting, so a burst of lines costs one
/// write per output, and no line waits for more to come.
struct Tee<F: std::io::Write> {
    stdout: BufWriter<std::io::Stdout>,
    file: F,
}

impl<F: std::io::Write> Write for Tee<F> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let _ = self.stdout.write_all(line);
        self.file.write_all(line)?;
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.stdout.flush();
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The lines `format` writes for a few events like the worker's.
    fn lines(format: LogFormat) -> Vec<String> {
        #[derive(Clone, Default)]
        struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(data);
                Ok(data.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .event_format(LineFormat::new("w-\"1\"", format))
                .with_writer(move || writer.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let error = "main server answered HTTP 503: \"busy\"\nsecond line";
            let id = "m-1";
            tracing::warn!(
                message_id = id,
                trace_id = %"4bf92f3577b34da6a3ce929d0e0e4736",
                attempt = 3u32,
                retry_in = ?Duration::from_millis(1500),
                error,
                "Delivery failed; will retry"
            );
            tracing::error!(
                reason = "rejected",
                count = 7u64,
                ok = false,
                rate = 0.25,
                delta = -2i64,
                "{} more messages moved ({})",
                7,
                "rejected"
            );
            tracing::info!("Shutdown requested; draining");
        });
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap().lines().map(str::to_string).collect()
    }

    #[test]
    fn json_lines_carry_every_field_as_its_own_key() {
        let lines = lines(LogFormat::Json);
        assert_eq!(lines.len(), 3);
        let parsed: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect();
        let retry = &parsed[0];
        let ts = retry["ts"].as_str().unwrap();
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{ts}");
        assert!(chrono::DateTime::parse_from_rfc3339(ts).is_ok(), "{ts}");
        assert_eq!(retry["level"], "WARNING");
        assert_eq!(retry["worker_id"], "w-\"1\"");
        assert_eq!(retry["message"], "Delivery failed; will retry");
        assert_eq!(retry["message_id"], "m-1");
        assert_eq!(retry["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(retry["attempt"], 3);
        assert_eq!(retry["retry_in"], "1.5s");
        assert_eq!(retry["error"], "main server answered HTTP 503: \"busy\"\nsecond line");
        let summary = &parsed[1];
        assert_eq!(summary["message"], "7 more messages moved (rejected)");
        assert_eq!(
            (&summary["count"], &summary["ok"], &summary["rate"], &summary["delta"]),
            (
                &serde_json::json!(7),
                &serde_json::json!(false),
                &serde_json::json!(0.25),
                &serde_json::json!(-2)
            )
        );
        assert_eq!(parsed[2].as_object().unwrap().len(), 4, "ts, level, worker_id, message");
    }

    #[test]
    fn text_lines_are_the_old_workers() {
        let lines = lines(LogFormat::Text);
        let rest: Vec<&str> = lines.iter().map(|l| &l[23..]).collect();
        assert_eq!(
            rest,
            [
                " - worker - WARNING - [w-\"1\"] - Delivery failed; will retry message_id=m-1 \
                 trace_id=4bf92f3577b34da6a3ce929d0e0e4736 attempt=3 retry_in=1.5s \
                 error=\"main server answered HTTP 503: \\\"busy\\\"\\nsecond line\"",
                " - worker - ERROR - [w-\"1\"] - 7 more messages moved (rejected) reason=rejected \
                 count=7 ok=false rate=0.25 delta=-2",
                " - worker - INFO - [w-\"1\"] - Shutdown requested; draining",
            ]
        );
    }

    #[test]
    fn quoting_matches_rusts_debug_for_log_values() {
        for value in [
            "main server answered HTTP 503: injected 503",
            "say \"hi\" \\ bye",
            "line one\nline two\ttab\r",
            "naïve café ✓",
            "",
        ] {
            let mut quoted = String::from("\"");
            quote_into(&mut quoted, value);
            quoted.push('"');
            assert_eq!(quoted, format!("{value:?}"));
        }
    }

    #[test]
    fn log_files_roll_by_size_and_keep_seven() {
        let dir = tempfile::tempdir().unwrap();
        // Someone else's file in the directory is left alone.
        std::fs::write(dir.path().join("other.log"), "keep me").unwrap();
        let mut line = vec![b'x'; 99];
        line.push(b'\n');
        let mut file = RollingFile::open(dir.path(), 1000, KEEP_FILES).unwrap();
        for _ in 0..200 {
            file.write_all(&line).unwrap();
        }
        file.flush().unwrap();
        let files = log_files(dir.path()).unwrap();
        assert_eq!(files.len(), KEEP_FILES);
        for (_, _, path) in &files {
            let len = std::fs::metadata(path).unwrap().len();
            assert!(len <= 1000, "{} is {len} bytes", path.display());
        }
        let newest = files.iter().map(|(_, i, _)| *i).max().unwrap();
        assert_eq!(newest, 19, "20 files of ten whole lines each were written");
        assert!(dir.path().join("other.log").exists());

        // A restart goes on with the newest file instead of starting over at .log.
        drop(file);
        let mut again = RollingFile::open(dir.path(), 1000, KEEP_FILES).unwrap();
        assert_eq!(again.index, newest);
        again.write_all(b"after restart\n").unwrap();
    }
}
