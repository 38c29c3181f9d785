//! `courier dlq list|stats|show|requeue|purge`: dead letters, read in any shape through
//! `crate::dlq`, printed with control characters escaped, and moved back to the queue one
//! script each.

use std::process::ExitCode;

use anyhow::{anyhow, bail};

use super::{connect, oneshot, settings_for, DlqCommand, FilterArgs};
use crate::config::RedisSettings;
use crate::dlq::{self, parse_time_bound, Action, Filter, Letter, Options, Outcome};

/// Text from Redis or the main server made safe for a terminal: control characters (escape
/// sequences among them) shown escaped as `\u{1b}`, `\n` and so on, and at most `max`
/// characters, with `...` when cut. Cuts between characters, never inside one.
pub fn printable(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max.saturating_mul(4)));
    let mut shown = 0usize;
    for c in text.chars() {
        let piece: String = if c.is_control() {
            c.escape_debug().collect()
        } else {
            c.to_string()
        };
        let width = piece.chars().count();
        if shown + width > max {
            let keep = max.saturating_sub(3);
            while out.chars().count() > keep {
                out.pop();
            }
            out.push_str("...");
            return out;
        }
        shown += width;
        out.push_str(&piece);
    }
    out
}

impl FilterArgs {
    /// The filter, or one line naming the option that is wrong.
    fn filter(&self) -> anyhow::Result<Filter> {
        let now = chrono::Utc::now();
        let time = |name: &str, text: &Option<String>| {
            text.as_deref()
                .map(|t| parse_time_bound(t, now).map_err(|e| anyhow!("--{name}: {e}")))
                .transpose()
        };
        Ok(Filter {
            reason: self.reason.iter().filter(|r| !r.is_empty()).cloned().collect(),
            status: self.status.clone(),
            since: time("since", &self.since)?,
            until: time("until", &self.until)?,
            grep: self.grep.clone().filter(|g| !g.is_empty()),
            ids: Vec::new(),
        })
    }
}

/// Whether stdout is a terminal (progress lines are for people).
fn on_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// One dead letter as a line of the table.
fn row(letter: &Letter) -> String {
    let h = &letter.header;
    let field = |text: &Option<String>, max: usize| printable(text.as_deref().unwrap_or(""), max);
    format!(
        "{:<24} {:<20} {:<6} {:<25} {}",
        printable(letter.message_id().unwrap_or("(no message_id)"), 64),
        field(&h.reason, 32),
        letter.status().map(|s| s.to_string()).unwrap_or_default(),
        field(&h.dead_at, 32),
        field(&h.error, 80),
    )
}

/// `dlq list`.
async fn list(settings: &RedisSettings, queue: &str, filter: &Filter, limit: usize, json: bool) -> anyhow::Result<()> {
    let (mut conn, keys) = connect(settings).await?;
    let listing = dlq::list(&mut conn, &keys, filter, None, limit, u64::MAX).await?;
    if !json {
        let what = if filter.is_empty() { "" } else { " matching" };
        println!(
            "{} of {} dead letter(s) on {}:dead{what}, newest first",
            listing.letters.len(),
            listing.total,
            printable(queue, 64)
        );
    }
    for letter in &listing.letters {
        if json {
            println!("{}", letter.to_json());
        } else {
            // Everything here came from a queue item or the main server: escaped and cut by
            // characters before it reaches the terminal.
            println!("{}", row(letter));
        }
    }
    Ok(())
}

/// `dlq stats`.
async fn stats(settings: &RedisSettings, filter: &Filter, json: bool) -> anyhow::Result<()> {
    let (mut conn, keys) = connect(settings).await?;
    let stats = dlq::stats(&mut conn, &keys, filter).await?;
    if json {
        println!("{}", serde_json::to_string(&stats)?);
        return Ok(());
    }
    println!("{} dead letter(s)", stats.total);
    println!(
        "{:>8}  {:<20} {:<6} {:<24} {:<24} error",
        "count", "reason", "status", "oldest", "newest"
    );
    for g in &stats.groups {
        println!(
            "{:>8}  {:<20} {:<6} {:<24} {:<24} {}",
            g.count,
            printable(&g.reason, 20),
            g.status.map(|s| s.to_string()).unwrap_or_default(),
            printable(g.oldest.as_deref().unwrap_or(""), 24),
            printable(g.newest.as_deref().unwrap_or(""), 24),
            printable(&g.error, 100),
        );
    }
    Ok(())
}

/// `dlq show ID`: every dead letter of that id, whole.
async fn show(settings: &RedisSettings, id: &str) -> anyhow::Result<()> {
    let (mut conn, keys) = connect(settings).await?;
    let filter = Filter {
        ids: vec![id.to_string()],
        ..Filter::default()
    };
    let mut from = None;
    let mut shown = 0;
    loop {
        let listing = dlq::list(&mut conn, &keys, &filter, from, 1, u64::MAX).await?;
        for letter in &listing.letters {
            // The listing holds the start of the record; read this one whole.
            let json = match dlq::whole(&mut conn, &keys, letter).await? {
                Some(whole) => whole.to_json(),
                None => letter.to_json(),
            };
            println!("{}", serde_json::to_string_pretty(&json).unwrap_or_default());
            shown += 1;
        }
        match listing.next {
            Some(next) if !listing.letters.is_empty() => from = Some(next),
            _ => break,
        }
    }
    if shown == 0 {
        bail!("no dead letter with message_id {id:?}; `courier dlq list` shows what there is");
    }
    Ok(())
}

/// `dlq requeue` and `dlq purge`.
async fn act(
    settings: &RedisSettings,
    queue: &str,
    filter: &Filter,
    action: Action,
    options: &Options,
) -> anyhow::Result<Outcome> {
    let (mut conn, keys) = connect(settings).await?;
    let terminal = on_terminal() && !options.dry_run;
    let mut last = std::time::Instant::now();
    let outcome = dlq::act(&mut conn, &keys, filter, action, options, |o| {
        if terminal && last.elapsed() >= std::time::Duration::from_millis(200) {
            last = std::time::Instant::now();
            eprint!("\r{} read, {} selected, {} done   ", o.scanned, o.matched, o.done);
        }
    })
    .await?;
    if terminal {
        eprintln!();
    }
    let verb = match action {
        Action::Requeue { front: true } => "requeue at the front of",
        Action::Requeue { front: false } => "requeue at the back of",
        Action::Purge => "delete from the dead letters of",
    };
    if options.dry_run {
        println!(
            "dry run: would {verb} {}: {} of {} dead letter(s)",
            printable(queue, 64),
            outcome.matched,
            outcome.scanned
        );
        for id in &outcome.ids {
            println!("  {}", printable(id, 64));
        }
        let listed = u64::try_from(outcome.ids.len()).unwrap_or(u64::MAX);
        if outcome.matched > listed {
            println!("  ... and {} without an id or not listed", outcome.matched - listed);
        }
    } else {
        let done = match action {
            Action::Requeue { .. } => "requeued (attempt_count 0)",
            Action::Purge => "deleted",
        };
        println!(
            "{done}: {} of {} selected dead letter(s) on {} ({} read)",
            outcome.done,
            outcome.matched,
            printable(queue, 64),
            outcome.scanned
        );
        if outcome.changed > 0 {
            println!(
                "{} selected dead letter(s) were moved or removed by someone else meanwhile; run \
                 again to catch any still there",
                outcome.changed
            );
        }
    }
    Ok(outcome)
}

/// The ids asked for that were not acted on.
fn missing(ids: &[String], outcome: &Outcome) -> Vec<String> {
    ids.iter().filter(|id| !outcome.ids.contains(id)).cloned().collect()
}

/// `courier dlq ...`.
pub(super) fn command(command: DlqCommand) -> ExitCode {
    match command {
        DlqCommand::List {
            config,
            queue,
            filter,
            limit,
            json,
        } => match settings_for(config, queue) {
            Ok(settings) => oneshot(async move {
                let filter = filter.filter()?;
                list(&settings.redis, settings.redis.first_queue(), &filter, limit, json).await
            }),
            Err(code) => code,
        },
        DlqCommand::Stats {
            config,
            queue,
            filter,
            json,
        } => match settings_for(config, queue) {
            Ok(settings) => oneshot(async move {
                let filter = filter.filter()?;
                stats(&settings.redis, &filter, json).await
            }),
            Err(code) => code,
        },
        DlqCommand::Show { config, queue, id } => match settings_for(config, queue) {
            Ok(settings) => oneshot(async move { show(&settings.redis, &id).await }),
            Err(code) => code,
        },
        DlqCommand::Requeue {
            config,
            queue,
            ids,
            filter,
            all,
            dry_run,
            rate,
            front,
            limit,
        } => {
            if rate.is_some_and(|r| !dlq::usable_rate(r)) {
                eprintln!(
                    "courier: --rate must be a number of dead letters per second of at least \
                     1e-18, such as 50"
                );
                return ExitCode::from(2);
            }
            match settings_for(config, queue) {
                Ok(settings) => oneshot(async move {
                    let mut filter = filter.filter()?;
                    filter.ids.clone_from(&ids);
                    refuse_everything(&filter, all, "requeue")?;
                    let options = Options { dry_run, limit, rate };
                    let queue = settings.redis.first_queue().to_string();
                    let outcome = act(&settings.redis, &queue, &filter, Action::Requeue { front }, &options).await?;
                    let missing = missing(&ids, &outcome);
                    if !missing.is_empty() {
                        bail!("not in the dead-letter list: {}", missing.join(", "));
                    }
                    Ok(())
                }),
                Err(code) => code,
            }
        }
        DlqCommand::Purge {
            config,
            queue,
            filter,
            all,
            dry_run,
            yes,
            limit,
        } => {
            if !yes && !dry_run {
                eprintln!(
                    "courier: purge deletes dead letters for good; pass --yes to do it, or \
                     --dry-run to see what it would delete"
                );
                return ExitCode::FAILURE;
            }
            match settings_for(config, queue) {
                Ok(settings) => oneshot(async move {
                    let filter = filter.filter()?;
                    refuse_everything(&filter, all, "purge")?;
                    let queue = settings.redis.first_queue().to_string();
                    if filter.is_empty() && !dry_run && limit.is_none() {
                        let (mut conn, keys) = connect(&settings.redis).await?;
                        let n = dlq::purge_all(&mut conn, &keys).await?;
                        println!("deleted {n} dead letter(s) from {}:dead", printable(&queue, 64));
                        return Ok(());
                    }
                    let options = Options {
                        dry_run,
                        limit,
                        rate: None,
                    };
                    act(&settings.redis, &queue, &filter, Action::Purge, &options).await?;
                    Ok(())
                }),
                Err(code) => code,
            }
        }
    }
}

/// Requeue and purge act on everything only when told so.
fn refuse_everything(filter: &Filter, all: bool, verb: &str) -> anyhow::Result<()> {
    if filter.is_empty() && !all {
        bail!(
            "refusing to {verb} every dead letter: name message ids, narrow with --reason, \
             --status, --since, --until or --grep, or pass --all"
        );
    }
    if !filter.is_empty() && all {
        bail!(
            "--all and a filter contradict each other: drop --all to {verb} only what the filter \
             selects"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_control_characters_and_cuts_between_characters() {
        assert_eq!(printable("plain", 10), "plain");
        assert_eq!(printable("a\x1b[31mred\x07", 40), "a\\u{1b}[31mred\\u{7}");
        assert_eq!(printable("line\nnext", 40), "line\\nnext");
        // A multi-byte character straddling the cut: the old byte truncation panicked here.
        let text = format!("{}é{}", "x".repeat(76), "y".repeat(10));
        let cut = printable(&text, 80);
        assert_eq!(cut.chars().count(), 80);
        assert!(cut.ends_with("..."));
        assert_eq!(printable(&"é".repeat(100), 10), format!("{}...", "é".repeat(7)));
    }
}
