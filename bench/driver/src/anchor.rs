//! The Node.js anchor (../shared/anchors/node-cluster): its cluster server for the side-by-side
//! rounds, and its own reload benchmark for the reload figures.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::proc::{self, Server};

pub(crate) fn node_available() -> bool {
    Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Starts `node server.js` (the cluster master and 2 workers, as in the anchor's recorded run)
/// on a free port.
pub(crate) fn start_cluster(dir: &Path) -> Result<Server> {
    std::fs::write(dir.join("version.txt"), "v0\n")?;
    let port = proc::free_port()?;
    let mut cmd = Command::new("node");
    cmd.arg("server.js").current_dir(dir).env("PORT", port.to_string()).env("HOST", "127.0.0.1").env("WORKERS", "2");
    let ready = move |log: &str| (log.matches("serving version").count() >= 2).then_some(port);
    Server::start("node-cluster", cmd, dir.join("cluster-bench.log"), ready)
}

/// The anchor's summary table: one row per metric, one column per anchor.
#[derive(Debug, Default)]
pub(crate) struct Summary {
    pub(crate) anchors: Vec<String>,
    pub(crate) rows: Vec<(String, Vec<String>)>,
    pub(crate) command: String,
}

impl Summary {
    /// The value of the first row whose metric starts with `prefix`, for `anchor`.
    pub(crate) fn get(&self, prefix: &str, anchor: &str) -> Option<&str> {
        let column = self.anchors.iter().position(|a| a == anchor)?;
        let (_, values) = self.rows.iter().find(|(metric, _)| metric.starts_with(prefix))?;
        values.get(column).map(String::as_str)
    }
}

/// Runs the anchor's bench.sh (cluster, and PM2 when `npm ci` installed it) and reads its
/// summary. It takes a few minutes; every loop in it is bounded.
pub(crate) fn run_reload_bench(dir: &Path) -> Result<Summary> {
    // PM2 is there when bench/run.sh could `npm ci`; the cluster anchor needs only node.
    let which = if dir.join("node_modules/.bin/pm2").exists() { "cluster pm2" } else { "cluster" };
    eprintln!("== anchor reload benchmark (bench.sh, ANCHORS=\"{which}\"): a few minutes");
    let out = Command::new("bash")
        .arg("bench.sh")
        .current_dir(dir)
        .env("ANCHORS", which)
        .output()
        .context("cannot run the anchor's bench.sh")?;
    let log = String::from_utf8_lossy(&out.stderr);
    let Some(results) = log.lines().rev().find_map(|l| l.split("results in ").nth(1)) else {
        bail!("the anchor's bench.sh did not finish:\n{log}{}", String::from_utf8_lossy(&out.stdout));
    };
    let text = std::fs::read_to_string(Path::new(results.trim()).join("summary.txt")).context("the anchor's summary.txt")?;
    let mut lines = text.lines();
    let header = lines.next().context("empty summary")?;
    let cells = |line: &str| line.split(" | ").map(|c| c.trim().to_owned()).collect::<Vec<_>>();
    let anchors = cells(header).into_iter().skip(1).collect();
    let rows = lines.map(cells).filter(|c| c.len() > 1).map(|mut c| (c.remove(0), c)).collect();
    Ok(Summary { anchors, rows, command: format!("ANCHORS=\"{which}\" bash bench.sh") })
}
