//! `branch-gateway quarantine list | retry SEQ... | retry --all | drop SEQ... | drop --all`:
//! what central refused, for branch IT once central is fixed (see the README's
//! "Quarantine"). Works whether the gateway runs or not.

use std::path::PathBuf;

use anyhow::Context;
use branch_gateway::{buffer, config, model};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum Action {
    /// The quarantined rows, oldest first, with their reasons (payloads are not shown).
    List {
        #[arg(long, short)]
        config: PathBuf,
        /// List rows after this `seq` (for paging).
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Put rows back for forwarding, with their `seq`s (sent within about 10 s).
    Retry {
        #[arg(long, short)]
        config: PathBuf,
        seqs: Vec<i64>,
        #[arg(long, conflicts_with = "seqs")]
        all: bool,
    },
    /// Delete rows for good (counted per device as `quarantine_dropped`).
    Drop {
        #[arg(long, short)]
        config: PathBuf,
        seqs: Vec<i64>,
        #[arg(long, conflicts_with = "seqs")]
        all: bool,
    },
}

fn select(seqs: Vec<i64>, all: bool) -> anyhow::Result<buffer::Select> {
    match (all, seqs.is_empty()) {
        (true, _) => Ok(buffer::Select::All),
        (false, false) => Ok(buffer::Select::Seqs(seqs)),
        (false, true) => anyhow::bail!("name the rows (SEQ...) or say --all"),
    }
}

impl Action {
    pub fn config(&self) -> &PathBuf {
        match self {
            Action::List { config, .. }
            | Action::Retry { config, .. }
            | Action::Drop { config, .. } => config,
        }
    }
}

pub fn run(loaded: &config::Loaded, action: Action) -> anyhow::Result<()> {
    let path = loaded.database_path();
    if !path.exists() {
        anyhow::bail!("no buffer database at {} yet", path.display());
    }
    match action {
        Action::List { after, limit, .. } => {
            let conn = buffer::open_read_only(&path)?;
            let counts = buffer::quarantine_counts(&conn).context("cannot read the quarantine")?;
            let total: i64 = counts.iter().map(|c| c.3).sum();
            println!("{total} quarantined");
            for (device, kind, reason, n) in &counts {
                println!("  {device} {kind} {reason}: {n}");
            }
            let rows = buffer::quarantine_list(&conn, after, limit.clamp(1, 100_000))
                .context("cannot read the quarantine")?;
            if rows.is_empty() {
                return Ok(());
            }
            println!(
                "{:>12} {:<20} {:<10} {:<24} {:>8}  {:<24} REASON",
                "SEQ", "DEVICE", "KIND", "RECEIVED", "BYTES", "QUARANTINED"
            );
            for r in rows {
                println!(
                    "{:>12} {:<20} {:<10} {:<24} {:>8}  {:<24} {}",
                    r.seq,
                    r.device,
                    r.kind,
                    model::format_ms(r.received_ms),
                    r.bytes,
                    model::format_ms(r.at_ms),
                    r.reason
                );
            }
        }
        Action::Retry { seqs, all, .. } => {
            let which = select(seqs, all)?;
            let mut conn = buffer::open_for_quarantine(&path)?;
            let done = buffer::retry(&mut conn, &which, model::now_ms())
                .context("cannot put the rows back")?;
            report(&which, &done, "put back for forwarding");
        }
        Action::Drop { seqs, all, .. } => {
            let which = select(seqs, all)?;
            let mut conn = buffer::open_for_quarantine(&path)?;
            let done = buffer::drop_rows(&mut conn, &which, model::now_ms())
                .context("cannot drop the rows")?;
            report(&which, &done, "dropped");
        }
    }
    Ok(())
}

fn report(which: &buffer::Select, done: &[i64], what: &str) {
    println!("{} rows {what}", done.len());
    if let buffer::Select::Seqs(asked) = which {
        let missing: Vec<String> = asked
            .iter()
            .filter(|s| !done.contains(s))
            .map(i64::to_string)
            .collect();
        if !missing.is_empty() {
            println!("not in the quarantine: {}", missing.join(" "));
        }
    }
}
