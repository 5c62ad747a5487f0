//! The monitoring kit in contrib/, checked against a real cluster with the worker running
//! and a real receiver: endpoints in several states (delivering, failing with their circuit
//! open, disabled by a 410 Gone with dead deliveries), then every query of both exporter
//! configurations run as a monitoring role. Each configuration must export exactly the
//! series of `outbox.metrics`, both the same ones (same names, same labels), and every series
//! the Grafana dashboard or the alert rules use must be among them and have samples here.
//!
//! The exporters are not run: what each makes of a query's rows follows their source
//! (postgres_exporter: `<entry>_<column>` per value column, every LABEL column on every
//! value, NULL exported as NaN, a value that does not parse skipped, a HISTOGRAM column as
//! bounds and cumulative counts arrays plus `_sum` and `_count`; sql_exporter:
//! `metric_name`, `key_labels`, one of `values`, NULL skipped). An empty label is no label to
//! Prometheus, so labels whose value is "" are dropped before comparing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::worker::{endpoint, wait_until, FAST};
use common::Cluster;
use outbox_receiver::{Receiver, Reply};
use postgres::types::Type;
use serde_yaml::Value as Yaml;

const PG_EXPORTER: &str = include_str!("../contrib/postgres_exporter.yml");
const SQL_COLLECTOR: &str = include_str!("../contrib/sql_exporter/webhook_outbox.collector.yml");
const SQL_EXPORTER: &str = include_str!("../contrib/sql_exporter/sql_exporter.yml");
const DASHBOARD: &str = include_str!("../contrib/grafana/webhook_outbox.json");
const RULES: &str = include_str!("../contrib/prometheus/webhook_outbox.rules.yml");
const RULES_TEST: &str = include_str!("../contrib/prometheus/webhook_outbox.rules.test.yml");

/// The series of `outbox.metrics` (see docs/monitoring.md): what each configuration exports.
const SERIES: [&str; 15] = [
    "outbox_deliveries",
    "outbox_oldest_pending_seconds",
    "outbox_oldest_due_seconds",
    "outbox_log_unread",
    "outbox_log_oldest_unread_seconds",
    "outbox_worker_up",
    "outbox_worker_processes",
    "outbox_finished_total",
    "outbox_attempts_total",
    "outbox_delivery_latency_seconds_bucket",
    "outbox_delivery_latency_seconds_sum",
    "outbox_delivery_latency_seconds_count",
    "outbox_endpoint_consecutive_failures",
    "outbox_endpoint_enabled",
    "outbox_endpoint_circuit_open",
];

/// The alerts docs/monitoring.md describes.
const ALERTS: [&str; 7] = [
    "OutboxWorkerDown",
    "OutboxMetricsAbsent",
    "OutboxDeliveriesOverdue",
    "OutboxLogNotRead",
    "OutboxCircuitOpen",
    "OutboxDeadLettersRising",
    "OutboxEndpointDisabled",
];

/// Gauges that move with the clock: compared between the exporters by presence only.
const CLOCK_GAUGES: [&str; 3] = [
    "outbox_oldest_pending_seconds",
    "outbox_oldest_due_seconds",
    "outbox_log_oldest_unread_seconds",
];

/// One exported sample: name, labels (none empty) and value.
#[derive(Clone, Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    fn new(name: String, labels: &[(String, String)], value: f64) -> Sample {
        let labels = labels
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .cloned()
            .collect();
        Sample {
            name,
            labels,
            value,
        }
    }

    /// The series' identity as Prometheus writes it: `name{a="1",b="2"}`.
    fn id(&self) -> String {
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        format!("{}{{{}}}", self.name, labels.join(","))
    }
}

/// What an exporter made of its configuration in this cluster.
#[derive(Default)]
struct Export {
    /// Metric names the configuration declares, whatever rows come back.
    declared: BTreeSet<String>,
    samples: Vec<Sample>,
    /// Problems that would show in the exporter (query errors, NaN values, duplicates...).
    errors: Vec<String>,
}

impl Export {
    fn names_with_samples(&self) -> BTreeSet<String> {
        self.samples.iter().map(|s| s.name.clone()).collect()
    }

    fn by_id(&self) -> BTreeMap<String, f64> {
        self.samples.iter().map(|s| (s.id(), s.value)).collect()
    }

    /// A series exported twice in one scrape fails the whole scrape in client_golang; a NaN
    /// is a value no dashboard can use.
    fn check_samples(&mut self, config: &str) {
        let mut seen = BTreeSet::new();
        for s in &self.samples {
            if !seen.insert(s.id()) {
                self.errors
                    .push(format!("{config}: series {} exported twice", s.id()));
            }
            if s.value.is_nan() {
                self.errors
                    .push(format!("{config}: series {} exported as NaN", s.id()));
            }
        }
    }
}

/// One result cell, as a Go database driver would hand it to the exporter.
#[derive(Clone, Debug)]
enum Cell {
    Null,
    Text(String),
    Number(f64),
    Floats(Vec<f64>),
    Integers(Vec<i64>),
}

fn cell(row: &postgres::Row, i: usize) -> Result<Cell, String> {
    let column = &row.columns()[i];
    let ty = column.type_();
    let cell = if *ty == Type::TEXT || *ty == Type::VARCHAR {
        row.get::<_, Option<String>>(i).map(Cell::Text)
    } else if *ty == Type::FLOAT8 {
        row.get::<_, Option<f64>>(i).map(Cell::Number)
    } else if *ty == Type::FLOAT4 {
        row.get::<_, Option<f32>>(i).map(|v| Cell::Number(v.into()))
    } else if *ty == Type::INT8 {
        row.get::<_, Option<i64>>(i).map(|v| Cell::Number(v as f64))
    } else if *ty == Type::INT4 {
        row.get::<_, Option<i32>>(i).map(|v| Cell::Number(v.into()))
    } else if *ty == Type::FLOAT8_ARRAY {
        row.get::<_, Option<Vec<f64>>>(i).map(Cell::Floats)
    } else if *ty == Type::INT8_ARRAY {
        row.get::<_, Option<Vec<i64>>>(i).map(Cell::Integers)
    } else {
        return Err(format!(
            "column {} is of type {ty}, which this test does not read (cast it)",
            column.name()
        ));
    };
    Ok(cell.unwrap_or(Cell::Null))
}

/// A label value as postgres_exporter and sql_exporter write it (NULL: "").
fn label_value(c: &Cell) -> String {
    match c {
        Cell::Null => String::new(),
        Cell::Text(s) => s.clone(),
        Cell::Number(v) => go_float(*v),
        other => format!("{other:?}"),
    }
}

/// Go's strconv.FormatFloat(v, 'g', -1, 64) for the values used here (bucket bounds and
/// counts): the shortest representation, no exponent below 1e21.
fn go_float(v: f64) -> String {
    if v == f64::INFINITY {
        "+Inf".into()
    } else {
        format!("{v}")
    }
}

fn yaml_str<'a>(v: &'a Yaml, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Yaml::as_str)
}

fn yaml_strings(v: &Yaml, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Yaml::as_sequence)
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs contrib/postgres_exporter.yml's queries and exports their rows as postgres_exporter
/// does.
fn postgres_exporter(c: &mut postgres::Client) -> Export {
    let config: Yaml = serde_yaml::from_str(PG_EXPORTER).expect("postgres_exporter.yml parses");
    let entries = config
        .as_mapping()
        .expect("postgres_exporter.yml is a mapping of entries");
    let mut out = Export::default();
    for (entry, body) in entries {
        let entry = entry.as_str().expect("entry names are strings").to_string();
        let query = yaml_str(body, "query").unwrap_or_else(|| panic!("{entry}: no query"));
        // metrics: a list of one-key mappings, column -> {usage, description}.
        let mut columns: Vec<(String, String)> = Vec::new();
        for m in body
            .get("metrics")
            .and_then(Yaml::as_sequence)
            .unwrap_or_else(|| panic!("{entry}: no metrics list"))
        {
            let (name, spec) = m
                .as_mapping()
                .and_then(|m| m.iter().next())
                .unwrap_or_else(|| panic!("{entry}: a metric is not a column mapping"));
            let name = name.as_str().unwrap().to_string();
            let usage = yaml_str(spec, "usage").unwrap_or_default().to_string();
            assert!(
                yaml_str(spec, "description").is_some_and(|d| !d.is_empty()),
                "{entry}.{name}: no description"
            );
            assert!(
                ["LABEL", "DISCARD", "COUNTER", "GAUGE", "HISTOGRAM"].contains(&usage.as_str()),
                "{entry}.{name}: usage {usage:?}"
            );
            columns.push((name, usage));
        }
        let usage_of = |col: &str| -> Option<&str> {
            columns
                .iter()
                .find(|(n, _)| n == col)
                .map(|(_, u)| u.as_str())
        };
        for (name, usage) in &columns {
            match usage.as_str() {
                "COUNTER" | "GAUGE" => {
                    out.declared.insert(format!("{entry}_{name}"));
                }
                "HISTOGRAM" => {
                    for part in ["bucket", "sum", "count"] {
                        out.declared.insert(format!("{entry}_{name}_{part}"));
                    }
                }
                _ => {}
            }
        }
        let label_columns: Vec<&str> = columns
            .iter()
            .filter(|(_, u)| u == "LABEL")
            .map(|(n, _)| n.as_str())
            .collect();

        let rows = match c.query(query, &[]) {
            Ok(rows) => rows,
            Err(e) => {
                out.errors.push(format!(
                    "postgres_exporter entry {entry}: query failed: {e}"
                ));
                continue;
            }
        };
        let Some(first) = rows.first() else {
            continue;
        };
        let names: Vec<String> = first
            .columns()
            .iter()
            .map(|c| c.name().to_string())
            .collect();
        let declared: Vec<String> = columns.iter().map(|(n, _)| n.clone()).collect();
        if names != declared {
            // A column not declared is exported untyped; a declared one not returned is
            // silently nothing (or, for a histogram part, an error).
            out.errors.push(format!(
                "postgres_exporter entry {entry}: the query returns columns {names:?}, the entry declares {declared:?}"
            ));
            continue;
        }
        for row in &rows {
            let cells: Vec<Cell> = match (0..names.len()).map(|i| cell(row, i)).collect() {
                Ok(cells) => cells,
                Err(e) => {
                    out.errors
                        .push(format!("postgres_exporter entry {entry}: {e}"));
                    break;
                }
            };
            let get = |col: &str| -> &Cell { &cells[names.iter().position(|n| n == col).unwrap()] };
            let labels: Vec<(String, String)> = label_columns
                .iter()
                .map(|l| (l.to_string(), label_value(get(l))))
                .collect();
            for (i, name) in names.iter().enumerate() {
                let metric = format!("{entry}_{name}");
                match usage_of(name) {
                    Some("COUNTER") | Some("GAUGE") => match &cells[i] {
                        Cell::Null => out.samples.push(Sample::new(metric, &labels, f64::NAN)),
                        Cell::Number(v) => out.samples.push(Sample::new(metric, &labels, *v)),
                        // strconv.ParseFloat; one that fails is skipped (and logged).
                        Cell::Text(t) => {
                            if let Ok(v) = t.parse::<f64>() {
                                out.samples.push(Sample::new(metric, &labels, v));
                            }
                        }
                        other => out
                            .errors
                            .push(format!("{metric}: value {other:?} is not a number")),
                    },
                    Some("HISTOGRAM") => {
                        let bounds = match &cells[i] {
                            Cell::Floats(b) => b.clone(),
                            Cell::Null => Vec::new(),
                            other => {
                                out.errors
                                    .push(format!("{metric}: bounds {other:?} are not float8[]"));
                                continue;
                            }
                        };
                        let counts = match get(&format!("{name}_bucket")) {
                            Cell::Integers(b) => b.clone(),
                            Cell::Null => Vec::new(),
                            other => {
                                out.errors
                                    .push(format!("{metric}_bucket: {other:?} is not int8[]"));
                                continue;
                            }
                        };
                        let number = |c: &Cell| match c {
                            Cell::Number(v) => *v,
                            _ => f64::NAN,
                        };
                        let sum = number(get(&format!("{name}_sum")));
                        let count = number(get(&format!("{name}_count")));
                        if bounds.len() != counts.len()
                            || bounds.windows(2).any(|w| w[0] >= w[1])
                            || counts.windows(2).any(|w| w[0] > w[1])
                            || counts.last().is_some_and(|&l| l as f64 > count)
                        {
                            out.errors.push(format!(
                                "{metric}{labels:?}: not a cumulative histogram: bounds {bounds:?}, counts {counts:?}, count {count}"
                            ));
                        }
                        for (b, n) in bounds.iter().zip(&counts) {
                            let mut l = labels.clone();
                            l.push(("le".into(), go_float(*b)));
                            out.samples.push(Sample::new(
                                format!("{metric}_bucket"),
                                &l,
                                *n as f64,
                            ));
                        }
                        // client_golang adds the +Inf bucket: the count.
                        let mut l = labels.clone();
                        l.push(("le".into(), "+Inf".into()));
                        out.samples
                            .push(Sample::new(format!("{metric}_bucket"), &l, count));
                        out.samples
                            .push(Sample::new(format!("{metric}_sum"), &labels, sum));
                        out.samples
                            .push(Sample::new(format!("{metric}_count"), &labels, count));
                    }
                    _ => {}
                }
            }
        }
    }
    out.check_samples("postgres_exporter");
    out
}

/// Runs contrib/sql_exporter/webhook_outbox.collector.yml's queries and exports their rows
/// as sql_exporter does.
fn sql_exporter(c: &mut postgres::Client) -> Export {
    let collector: Yaml =
        serde_yaml::from_str(SQL_COLLECTOR).expect("webhook_outbox.collector.yml parses");
    let mut out = Export::default();
    let named: BTreeMap<String, String> = collector
        .get("queries")
        .and_then(Yaml::as_sequence)
        .map(|qs| {
            qs.iter()
                .map(|q| {
                    (
                        yaml_str(q, "query_name").expect("query_name").to_string(),
                        yaml_str(q, "query").expect("query").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    // The metrics of each query, which runs once per scrape.
    struct Metric {
        name: String,
        key_labels: Vec<String>,
        value: String,
    }
    let mut by_query: BTreeMap<String, Vec<Metric>> = BTreeMap::new();
    for m in collector
        .get("metrics")
        .and_then(Yaml::as_sequence)
        .expect("the collector has metrics")
    {
        let name = yaml_str(m, "metric_name").expect("metric_name").to_string();
        let kind = yaml_str(m, "type").unwrap_or_default();
        assert!(
            kind == "counter" || kind == "gauge",
            "{name}: type {kind:?} (sql_exporter knows counter and gauge)"
        );
        assert_eq!(
            kind == "counter",
            name.ends_with("_total")
                || name.ends_with("_bucket")
                || name.ends_with("_sum")
                || name.ends_with("_count"),
            "{name}: type {kind}: counters are the _total series and the histogram's"
        );
        assert!(
            yaml_str(m, "help").is_some_and(|h| !h.is_empty()),
            "{name}: no help"
        );
        let values = yaml_strings(m, "values");
        assert_eq!(
            values.len(),
            1,
            "{name}: one value column (no value_label here)"
        );
        let query = match (yaml_str(m, "query"), yaml_str(m, "query_ref")) {
            (Some(q), None) => q.to_string(),
            (None, Some(r)) => named
                .get(r)
                .unwrap_or_else(|| panic!("{name}: query_ref {r} is not among queries"))
                .clone(),
            _ => panic!("{name}: exactly one of query and query_ref"),
        };
        assert!(out.declared.insert(name.clone()), "{name} defined twice");
        by_query.entry(query).or_default().push(Metric {
            name,
            key_labels: yaml_strings(m, "key_labels"),
            value: values[0].clone(),
        });
    }
    for (query, metrics) in &by_query {
        let rows = match c.query(query.as_str(), &[]) {
            Ok(rows) => rows,
            Err(e) => {
                out.errors.push(format!(
                    "sql_exporter query of {}: failed: {e}",
                    metrics[0].name
                ));
                continue;
            }
        };
        let Some(first) = rows.first() else {
            continue;
        };
        let columns: Vec<(String, Type)> = first
            .columns()
            .iter()
            .map(|c| (c.name().to_string(), c.type_().clone()))
            .collect();
        let used: BTreeSet<&str> = metrics
            .iter()
            .flat_map(|m| m.key_labels.iter().chain([&m.value]))
            .map(String::as_str)
            .collect();
        for (name, ty) in &columns {
            if !used.contains(name.as_str()) {
                out.errors
                    .push(format!("sql_exporter: column {name} is used by no metric"));
            }
            let is_key = metrics.iter().any(|m| m.key_labels.contains(name));
            let is_value = metrics.iter().any(|m| &m.value == name);
            // Keys are scanned as strings, values as float64 (a text value fails the scan).
            if is_key && *ty != Type::TEXT {
                out.errors
                    .push(format!("sql_exporter: key column {name} is {ty}, not text"));
            }
            if is_value && ![Type::FLOAT8, Type::INT8, Type::INT4].contains(ty) {
                out.errors.push(format!(
                    "sql_exporter: value column {name} is {ty}, not a number"
                ));
            }
        }
        for u in &used {
            if !columns.iter().any(|(n, _)| n == u) {
                // sql_exporter: "Missing values for the requested columns".
                out.errors
                    .push(format!("sql_exporter: the query returns no column {u}"));
            }
        }
        if !out.errors.is_empty() {
            continue;
        }
        for row in &rows {
            let get = |col: &str| -> Cell {
                cell(row, columns.iter().position(|(n, _)| n == col).unwrap()).unwrap()
            };
            for m in metrics {
                // A NULL value: nothing for this metric on this row.
                let Cell::Number(v) = get(&m.value) else {
                    continue;
                };
                let labels: Vec<(String, String)> = m
                    .key_labels
                    .iter()
                    .map(|l| (l.clone(), label_value(&get(l))))
                    .collect();
                out.samples.push(Sample::new(m.name.clone(), &labels, v));
            }
        }
    }
    out.check_samples("sql_exporter");
    out
}

/// Every `outbox_...` metric name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while let Some(at) = expr[i..].find("outbox_") {
        let start = i + at;
        let mut end = start + "outbox_".len();
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        if start == 0 || !word(bytes[start - 1]) {
            names.insert(expr[start..end].to_string());
        }
        i = end;
    }
    names
}

/// Every `expr` of the dashboard's panels (rows' nested panels included).
fn dashboard_exprs(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
    for p in panels.as_array().into_iter().flatten() {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                assert_eq!(
                    t["datasource"]["uid"].as_str(),
                    Some("${datasource}"),
                    "panel {title}: its queries use the datasource variable"
                );
                out.push((title.clone(), e.to_string()));
            }
        }
        dashboard_exprs(&p["panels"], out);
    }
}

/// The alert rules: (alert name, rule) for every alerting rule.
fn alert_rules() -> Vec<(String, Yaml)> {
    let rules: Yaml = serde_yaml::from_str(RULES).expect("the rules file parses");
    let mut out = Vec::new();
    for g in rules
        .get("groups")
        .and_then(Yaml::as_sequence)
        .expect("the rules file has groups")
    {
        assert!(yaml_str(g, "name").is_some(), "a group without a name");
        for r in g.get("rules").and_then(Yaml::as_sequence).expect("rules") {
            if let Some(a) = yaml_str(r, "alert") {
                out.push((a.to_string(), r.clone()));
            }
        }
    }
    out
}

/// The sum of series `name`'s rows that match `filter` (`AND ...`), read directly from the
/// view; None when it has no such row.
fn metric(c: &mut postgres::Client, name: &str, filter: &str) -> Option<f64> {
    c.query_opt(
        &format!("SELECT sum(value) FROM outbox.metrics WHERE metric = '{name}' {filter} HAVING count(*) > 0"),
        &[],
    )
    .unwrap()
    .map(|r| r.get(0))
}

#[test]
fn both_exporter_configurations_export_every_series_the_dashboard_and_alerts_use() {
    // A circuit opens after 3 failures and stays open (its first probe is an hour away), so
    // the failing endpoint's deliveries stay pending and the numbers hold still.
    let settings: Vec<&str> = FAST
        .iter()
        .copied()
        .chain([
            "outbox.circuit_threshold = 3",
            "outbox.circuit_cooldown = '1h'",
        ])
        .collect();
    let cluster = Cluster::start(&settings);
    let rx = Receiver::start().unwrap();
    rx.set_default("/fail", Reply::Status(500));
    rx.set_default("/gone", Reply::Status(410));
    let mut admin = cluster.client();
    let ok = endpoint(&mut admin, &rx.url("/ok"), "");
    let failing = endpoint(&mut admin, &rx.url("/fail"), "");
    let gone = endpoint(&mut admin, &rx.url("/gone"), "");
    admin
        .batch_execute("SELECT outbox.enqueue('monitoring.test', '{}') FROM generate_series(1, 5)")
        .unwrap();

    let settled = wait_until(Duration::from_secs(60), || {
        let m = |c: &mut postgres::Client, name: &str, filter: &str| metric(c, name, filter);
        m(
            &mut admin,
            "outbox_finished_total",
            &format!("AND status = 'delivered' AND endpoint_id = '{ok}'"),
        ) == Some(5.0)
            && m(
                &mut admin,
                "outbox_endpoint_circuit_open",
                &format!("AND status = 'open' AND endpoint_id = '{failing}'"),
            ) == Some(1.0)
            && m(
                &mut admin,
                "outbox_endpoint_enabled",
                &format!("AND endpoint_id = '{gone}'"),
            ) == Some(0.0)
            && m(
                &mut admin,
                "outbox_finished_total",
                &format!("AND status = 'dead' AND endpoint_id = '{gone}'"),
            )
            .unwrap_or(0.0)
                >= 1.0
            && m(&mut admin, "outbox_deliveries", "AND status = 'in_flight'") == Some(0.0)
            && m(&mut admin, "outbox_log_unread", "") == Some(0.0)
    });
    assert!(
        settled,
        "the endpoints did not reach their states; metrics:\n{:#?}\nlog:\n{}",
        admin
            .query(
                "SELECT metric, status, endpoint_id, value FROM outbox.metrics WHERE le IS NULL",
                &[]
            )
            .unwrap()
            .iter()
            .map(|r| format!(
                "{} {:?} {:?} {}",
                r.get::<_, String>(0),
                r.get::<_, Option<String>>(1),
                r.get::<_, Option<String>>(2),
                r.get::<_, f64>(3)
            ))
            .collect::<Vec<_>>(),
        cluster.log()
    );
    assert!(
        metric(
            &mut admin,
            "outbox_endpoint_consecutive_failures",
            &format!("AND endpoint_id = '{failing}'")
        )
        .unwrap()
            >= 3.0
    );
    assert!(metric(&mut admin, "outbox_deliveries", "AND status = 'pending'").unwrap() >= 1.0);

    // The exporters' role: outbox.grant_operator() and nothing else.
    admin
        .batch_execute(
            "CREATE ROLE outbox_monitor LOGIN;
             SELECT outbox.grant_operator('outbox_monitor');",
        )
        .unwrap();
    let mut monitor = cluster.client_as("outbox_monitor");
    let pg = postgres_exporter(&mut monitor);
    let sql = sql_exporter(&mut monitor);

    // Every query ran, and nothing came out that Prometheus would refuse or choke on.
    let errors: Vec<&String> = pg.errors.iter().chain(&sql.errors).collect();
    assert!(errors.is_empty(), "exporter problems:\n{errors:#?}");

    // Exactly the series of outbox.metrics, declared by both, with samples in both.
    let series: BTreeSet<String> = SERIES.iter().map(|s| s.to_string()).collect();
    for (config, export) in [("postgres_exporter.yml", &pg), ("sql_exporter", &sql)] {
        let missing: Vec<&String> = series.difference(&export.declared).collect();
        let extra: Vec<&String> = export.declared.difference(&series).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{config} exports the wrong series: missing {missing:?}, not in outbox.metrics {extra:?}"
        );
        let sampled = export.names_with_samples();
        let without: Vec<&String> = series.difference(&sampled).collect();
        assert!(
            without.is_empty(),
            "{config}: no samples in this cluster for {without:?}"
        );
    }
    // The same series from both, label for label; the same values but for clock-driven ages.
    let (pg_ids, sql_ids) = (pg.by_id(), sql.by_id());
    let only_pg: Vec<&String> = pg_ids
        .keys()
        .filter(|k| !sql_ids.contains_key(*k))
        .collect();
    let only_sql: Vec<&String> = sql_ids
        .keys()
        .filter(|k| !pg_ids.contains_key(*k))
        .collect();
    assert!(
        only_pg.is_empty() && only_sql.is_empty(),
        "the exporters differ: only from postgres_exporter {only_pg:#?}, only from sql_exporter {only_sql:#?}"
    );
    for (id, v) in &pg_ids {
        let name = id.split('{').next().unwrap();
        if !CLOCK_GAUGES.contains(&name) {
            assert!(
                (v - sql_ids[id]).abs() < 1e-9,
                "{id}: {v} from postgres_exporter, {} from sql_exporter",
                sql_ids[id]
            );
        }
    }
    // What the view says, as exported: the scenario's states.
    let value = |id: &str| -> f64 {
        *sql_ids
            .get(id)
            .unwrap_or_else(|| panic!("no series {id}; exported: {:#?}", sql_ids.keys()))
    };
    assert_eq!(value("outbox_worker_up{}"), 1.0);
    assert!(value("outbox_worker_processes{}") >= 1.0);
    assert_eq!(
        value(&format!(
            "outbox_endpoint_enabled{{endpoint_id=\"{gone}\"}}"
        )),
        0.0
    );
    assert_eq!(
        value(&format!("outbox_endpoint_enabled{{endpoint_id=\"{ok}\"}}")),
        1.0
    );
    assert_eq!(
        value(&format!(
            "outbox_endpoint_circuit_open{{endpoint_id=\"{failing}\",status=\"open\"}}"
        )),
        1.0
    );
    assert_eq!(
        value(&format!(
            "outbox_endpoint_circuit_open{{endpoint_id=\"{ok}\",status=\"closed\"}}"
        )),
        0.0
    );
    assert!(
        value(&format!(
            "outbox_endpoint_consecutive_failures{{endpoint_id=\"{failing}\"}}"
        )) >= 3.0
    );
    assert!(value("outbox_deliveries{status=\"dead\"}") >= 1.0);
    assert!(value(&format!("outbox_attempts_total{{endpoint_id=\"{ok}\"}}")) >= 5.0);

    // The latency histogram, per endpoint: cumulative, its +Inf bucket equal to _count.
    for export in [&sql, &pg] {
        let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for s in export
            .samples
            .iter()
            .filter(|s| s.name == "outbox_delivery_latency_seconds_bucket")
        {
            let le = s.labels["le"].as_str();
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            buckets
                .entry(s.labels["endpoint_id"].clone())
                .or_default()
                .push((bound, s.value));
        }
        assert!(
            buckets.contains_key(&ok),
            "no latency histogram for the delivering endpoint"
        );
        for (endpoint_id, mut b) in buckets {
            b.sort_by(|x, y| x.0.total_cmp(&y.0));
            assert_eq!(b.len(), 17, "{endpoint_id}: 16 bounds and +Inf: {b:?}");
            assert!(
                b.windows(2).all(|w| w[0].1 <= w[1].1),
                "{endpoint_id}: not cumulative: {b:?}"
            );
            let count = value(&format!(
                "outbox_delivery_latency_seconds_count{{endpoint_id=\"{endpoint_id}\"}}"
            ));
            assert_eq!(
                b.last().unwrap(),
                &(f64::INFINITY, count),
                "{endpoint_id}: +Inf bucket vs _count"
            );
        }
    }
    assert_eq!(
        value(&format!(
            "outbox_delivery_latency_seconds_count{{endpoint_id=\"{ok}\"}}"
        )),
        5.0
    );

    // The dashboard and the alert rules use only series both exporters export, all with
    // samples here.
    let exported: BTreeSet<String> = pg
        .names_with_samples()
        .intersection(&sql.names_with_samples())
        .cloned()
        .collect();
    let mut uses: Vec<(String, String)> = Vec::new();
    let dashboard: serde_json::Value =
        serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    dashboard_exprs(&dashboard["panels"], &mut uses);
    assert!(uses.len() >= 10, "the dashboard has {} queries", uses.len());
    let rules = alert_rules();
    for (alert, rule) in &rules {
        let expr = yaml_str(rule, "expr").unwrap_or_else(|| panic!("{alert}: no expr"));
        uses.push((format!("alert {alert}"), expr.to_string()));
    }
    let mut unknown = Vec::new();
    for (place, expr) in &uses {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{place}: no outbox series in {expr}");
        for n in names {
            if !exported.contains(&n) {
                unknown.push(format!("{place}: {n}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "series used but not exported (or without samples): {unknown:#?}"
    );
    assert!(
        uses.iter().any(|(_, e)| e.contains(
            "histogram_quantile(0.99, sum by (le) (rate(outbox_delivery_latency_seconds_bucket"
        )),
        "the dashboard shows latency quantiles"
    );
}

/// The dashboard, the alert rules and the sql_exporter example hold together, without a
/// cluster.
#[test]
fn dashboard_rules_and_exporter_example_are_well_formed() {
    let d: serde_json::Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion"
    );
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()), "uid");
    let vars = d["templating"]["list"]
        .as_array()
        .expect("template variables");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no template variable {name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let ep = var("endpoint_id");
    assert_eq!(ep["multi"], true);
    assert_eq!(ep["datasource"]["uid"], "${datasource}");
    assert_eq!(
        ep["query"]["query"].as_str().or(ep["query"].as_str()),
        Some("label_values(outbox_endpoint_enabled, endpoint_id)")
    );
    // Panel ids are unique and panels do not overlap.
    let panels = d["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    let boxes: Vec<(String, [u64; 4])> = panels
        .iter()
        .map(|p| {
            let g = &p["gridPos"];
            let n = |k: &str| g[k].as_u64().unwrap();
            (
                p["title"].as_str().unwrap().to_string(),
                [n("x"), n("y"), n("w"), n("h")],
            )
        })
        .collect();
    for (i, (a, [ax, ay, aw, ah])) in boxes.iter().enumerate() {
        assert!(ax + aw <= 24, "{a} is wider than the dashboard");
        for (b, [bx, by, bw, bh]) in &boxes[i + 1..] {
            let overlap = ax < &(bx + bw) && bx < &(ax + aw) && ay < &(by + bh) && by < &(ay + ah);
            assert!(!overlap, "panels {a} and {b} overlap");
        }
    }

    let rules = alert_rules();
    let names: BTreeSet<&str> = rules.iter().map(|(a, _)| a.as_str()).collect();
    let missing: Vec<&&str> = ALERTS.iter().filter(|a| !names.contains(**a)).collect();
    assert!(
        missing.is_empty(),
        "alerts missing from the rules: {missing:?}"
    );
    for (alert, rule) in &rules {
        let severity = rule.get("labels").and_then(|l| yaml_str(l, "severity"));
        assert!(
            matches!(severity, Some("critical" | "warning" | "info")),
            "{alert}: severity {severity:?}"
        );
        for a in ["summary", "description"] {
            assert!(
                rule.get("annotations")
                    .and_then(|x| yaml_str(x, a))
                    .is_some_and(|s| !s.is_empty()),
                "{alert}: no {a}"
            );
        }
    }
    let rule = |name: &str| &rules.iter().find(|(a, _)| a == name).unwrap().1;
    let expr_for = |name: &str| {
        (
            yaml_str(rule(name), "expr").unwrap().to_string(),
            yaml_str(rule(name), "for").map(str::to_string),
        )
    };
    assert_eq!(
        expr_for("OutboxWorkerDown"),
        ("outbox_worker_up == 0".into(), Some("2m".into()))
    );
    assert_eq!(
        expr_for("OutboxMetricsAbsent"),
        ("absent(outbox_worker_up)".into(), Some("5m".into()))
    );
    assert_eq!(
        expr_for("OutboxDeliveriesOverdue"),
        ("outbox_oldest_due_seconds > 300".into(), Some("5m".into()))
    );
    assert_eq!(
        expr_for("OutboxLogNotRead"),
        (
            "outbox_log_oldest_unread_seconds > 60".into(),
            Some("5m".into())
        )
    );
    assert_eq!(expr_for("OutboxCircuitOpen").1.as_deref(), Some("10m"));
    assert!(expr_for("OutboxCircuitOpen")
        .0
        .contains("outbox_endpoint_circuit_open) == 1"));
    assert!(expr_for("OutboxDeadLettersRising")
        .0
        .contains("increase(outbox_finished_total{status=\"dead\"}[15m]) > 0"));
    // The promtool unit tests cover every alert.
    let tests: Yaml = serde_yaml::from_str(RULES_TEST).expect("the rules' tests parse");
    assert_eq!(
        yaml_strings(&tests, "rule_files"),
        ["webhook_outbox.rules.yml"]
    );
    for a in ALERTS {
        assert!(
            RULES_TEST.contains(&format!("alertname: {a}")),
            "no promtool test for {a}"
        );
    }

    // The sql_exporter example loads the collector.
    let example: Yaml = serde_yaml::from_str(SQL_EXPORTER).expect("sql_exporter.yml parses");
    let collector: Yaml = serde_yaml::from_str(SQL_COLLECTOR).unwrap();
    let name = yaml_str(&collector, "collector_name").unwrap();
    let target = example.get("target").expect("a target");
    assert_eq!(yaml_strings(target, "collectors"), [name]);
    assert!(yaml_str(target, "data_source_name").is_some_and(|d| d.starts_with("postgres://")));
    assert_eq!(
        yaml_strings(&example, "collector_files"),
        ["webhook_outbox.collector.yml"]
    );
}
