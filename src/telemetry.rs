//! Logging in the old worker's line format, on stdout and in a daily-rotated file
//! (`worker.YYYY-MM-DD.log` under LOG_FILE_PATH, seven files kept):
//!
//! `2025-01-15 10:30:45,123 - worker - INFO - [worker-1] - Message delivered message_id=...`

use std::fmt::{self, Write as _};
use std::io::{BufWriter, Write};
use std::path::Path;

use chrono::{Datelike, Timelike};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_appender::rolling::{Builder, Rotation};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Keeps the background log writer running; drop it last, when the process exits.
pub struct LogGuards(#[allow(dead_code)] WorkerGuard);

/// The seed's format: time, logger name, level (Python's names), worker id, message, then
/// the event's fields as `key=value`.
pub struct SeedFormat {
    worker_id: String,
}

impl<S, N> FormatEvent<S, N> for SeedFormat
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

/// Starts logging at `level` to stdout and to a daily file in `dir`. Dependencies log at
/// WARNING and above only, so a DEBUG run shows courier's own lines.
pub fn init(level: Level, dir: &Path, worker_id: &str) -> Result<LogGuards, String> {
    let unwritable = |e: &dyn std::fmt::Display| {
        format!(
            "logging.file_path (LOG_FILE_PATH) = {}: cannot write logs there ({e})",
            dir.display()
        )
    };
    std::fs::create_dir_all(dir).map_err(|e| unwritable(&e))?;
    let file = Builder::new()
        .rotation(Rotation::DAILY)
        .filename_prefix("worker")
        .filename_suffix("log")
        .max_log_files(7)
        .build(dir)
        .map_err(|e| {
            format!(
                "logging.file_path (LOG_FILE_PATH) = {}: cannot write logs there ({e})",
                dir.display()
            )
        })?;
    // One line is formatted once and handed to one background thread, which writes it to
    // both places: at thousands of retry lines a second, a second formatter and a second
    // thread to wake cost the worker measurably.
    let (writer, guard) = tracing_appender::non_blocking(Tee {
        stdout: BufWriter::new(std::io::stdout()),
        file: BufWriter::new(file),
    });
    let filter = Targets::new()
        .with_default(LevelFilter::from_level(level).min(LevelFilter::WARN))
        .with_target("courier", level);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .event_format(SeedFormat {
                    worker_id: worker_id.to_string(),
                })
                .with_writer(writer)
                .with_filter(filter),
        )
        .try_init()
        .map_err(|e| format!("logging could not start: {e}"))?;
    Ok(LogGuards(guard))
}

/// Writes each line to stdout and to the log file. A closed stdout (nothing reading it) does
/// not stop the file, which is the record that matters. Both are buffered: the background
/// thread flushes as soon as it has written every line waiting, so a burst of lines costs one
/// write per output, and no line waits for more to come.
struct Tee<F: std::io::Write> {
    stdout: BufWriter<std::io::Stdout>,
    file: BufWriter<F>,
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
    use super::*;

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
}
