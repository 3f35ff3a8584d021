//! The results: one row per figure, printed as it is measured and again as a table at the end,
//! and everything (rows and per-scenario details) written as JSON.

use std::path::Path;

use serde::Serialize;

use crate::system::Machine;
use crate::BenchError;

/// One figure of one scenario.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub scenario: String,
    pub figure: String,
    /// A number, or text for figures that are not one.
    pub value: serde_json::Value,
    pub unit: String,
    /// For a throughput: the value divided by the machine's ceiling (bare POSTs a second).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_ceiling: Option<f64>,
}

/// Everything a run measured.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub machine: Machine,
    /// The commit measured, `-dirty` when the working tree had changes.
    pub commit: String,
    /// `/proc/loadavg` when the run ended.
    pub load_average_at_end: String,
    pub settings: serde_json::Value,
    /// Bare POSTs a second over loopback: what every throughput is compared with.
    pub ceiling_posts_per_second: Option<f64>,
    pub rows: Vec<Row>,
    /// Per scenario: the raw measurements behind its rows (search steps, drops by reason, API
    /// request rates, CPU per process).
    pub details: serde_json::Map<String, serde_json::Value>,
    /// What was skipped or could not be measured, and why.
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(machine: Machine, settings: serde_json::Value) -> Report {
        Report {
            machine,
            commit: String::new(),
            load_average_at_end: String::new(),
            settings,
            ceiling_posts_per_second: None,
            rows: Vec::new(),
            details: serde_json::Map::new(),
            notes: Vec::new(),
        }
    }

    fn push(&mut self, row: Row) {
        println!("  {}", format_row(&row));
        self.rows.push(row);
    }

    /// A figure that is not a throughput.
    pub fn figure(&mut self, scenario: &str, figure: &str, value: f64, unit: &str) {
        self.push(Row {
            scenario: scenario.to_owned(),
            figure: figure.to_owned(),
            value: number(value),
            unit: unit.to_owned(),
            ratio_to_ceiling: None,
        });
    }

    /// A throughput, with its ratio to the ceiling when that was measured.
    pub fn throughput(&mut self, scenario: &str, figure: &str, value: f64, unit: &str) {
        let ratio = self
            .ceiling_posts_per_second
            .filter(|c| *c > 0.0)
            .map(|c| value / c);
        self.push(Row {
            scenario: scenario.to_owned(),
            figure: figure.to_owned(),
            value: number(value),
            unit: unit.to_owned(),
            ratio_to_ceiling: ratio,
        });
    }

    /// A figure that is text.
    pub fn text(&mut self, scenario: &str, figure: &str, value: &str) {
        self.push(Row {
            scenario: scenario.to_owned(),
            figure: figure.to_owned(),
            value: serde_json::Value::String(value.to_owned()),
            unit: String::new(),
            ratio_to_ceiling: None,
        });
    }

    /// Something skipped or not measured.
    pub fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        println!("  note: {text}");
        self.notes.push(text);
    }

    pub fn detail(&mut self, scenario: &str, value: impl Serialize) {
        let value = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
        self.details.insert(scenario.to_owned(), value);
    }

    /// The machine facts and every row, as a table.
    pub fn print(&self) {
        let m = &self.machine;
        println!();
        println!(
            "machine: {} cores, {}, {} MB, kernel {}; load average at start {}",
            m.nproc, m.cpu_model, m.memory_mb, m.kernel, m.load_average_at_start
        );
        println!(
            "commit: {}; load average at end {}",
            self.commit, self.load_average_at_end
        );
        if let Some(ceiling) = self.ceiling_posts_per_second {
            println!("ceiling: {ceiling:.0} bare POSTs/s (ratios below are to this)");
        }
        let width = |f: fn(&Row) -> String| self.rows.iter().map(|r| f(r).len()).max().unwrap_or(0);
        let (w1, w2, w3) = (
            width(|r| r.scenario.clone()).max(8),
            width(|r| r.figure.clone()).max(6),
            width(value_text).max(5),
        );
        // Scenarios in letter order; rows of one scenario in the order they were measured.
        let mut rows: Vec<&Row> = self.rows.iter().collect();
        rows.sort_by_key(|row| {
            let first = row.scenario.split(' ').next().unwrap_or_default();
            crate::SCENARIOS_IN_TABLE_ORDER
                .iter()
                .position(|s| *s == first)
                .unwrap_or(usize::MAX)
        });
        println!();
        println!(
            "{:<w1$}  {:<w2$}  {:>w3$}  ratio",
            "scenario", "figure", "value"
        );
        println!("{}", "-".repeat(w1 + w2 + w3 + 13));
        for row in rows {
            let ratio = row.ratio_to_ceiling.map(ratio_text).unwrap_or_default();
            println!(
                "{:<w1$}  {:<w2$}  {:>w3$}  {ratio}",
                row.scenario,
                row.figure,
                value_text(row)
            );
        }
        for note in &self.notes {
            println!("note: {note}");
        }
    }

    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(self)?)?;
        Ok(())
    }
}

fn number(value: f64) -> serde_json::Value {
    serde_json::Number::from_f64((value * 1000.0).round() / 1000.0)
        .map_or(serde_json::Value::Null, serde_json::Value::Number)
}

fn value_text(row: &Row) -> String {
    let value = match &row.value {
        serde_json::Value::Number(n) => {
            let v = n.as_f64().unwrap_or(0.0);
            if v.abs() >= 100.0 || v == v.trunc() {
                format!("{v:.0}")
            } else if v.abs() >= 1.0 {
                format!("{v:.2}")
            } else {
                format!("{v:.4}")
            }
        }
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if row.unit.is_empty() {
        value
    } else {
        format!("{value} {}", row.unit)
    }
}

fn ratio_text(ratio: f64) -> String {
    if ratio >= 0.1 {
        format!("{ratio:.2}")
    } else {
        format!("{ratio:.3}")
    }
}

fn format_row(row: &Row) -> String {
    let ratio = row
        .ratio_to_ceiling
        .map(|r| format!("  ({} of ceiling)", ratio_text(r)))
        .unwrap_or_default();
    format!(
        "{} | {}: {}{ratio}",
        row.scenario,
        row.figure,
        value_text(row)
    )
}
