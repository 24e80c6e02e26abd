//! `report`: analysis against numpy, and the page rendered in a real headless Chromium.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use crate::require;

/// The Chromium binary; a missing browser fails the test (scripts/test installs it).
fn chromium() -> Option<PathBuf> {
    let candidates = [
        std::env::var("GGUF_TRACE_CHROMIUM").unwrap_or_default(),
        "chromium".into(),
        "chromium-browser".into(),
        "google-chrome".into(),
    ];
    for c in candidates.iter().filter(|c| !c.is_empty()) {
        if Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some(PathBuf::from(c));
        }
    }
    panic!("chromium is missing; scripts/test installs it (or set GGUF_TRACE_CHROMIUM)");
}

/// Headless Chromium with the network off (every host unresolvable, a dead proxy) and software WebGL.
fn chrome(bin: &Path, profile: &Path) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "--headless",
        "--no-sandbox",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=http://127.0.0.1:9",
        "--use-angle=swiftshader",
        "--enable-unsafe-swiftshader",
        "--virtual-time-budget=30000",
    ]);
    c.arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// Open the report, return (figures declared, figures rendered, errors), and save a screenshot.
pub(crate) fn render_in_chromium(
    report: &Path,
    shot: &Path,
) -> Option<(usize, usize, Vec<String>)> {
    let c = check_page(report, shot)?;
    Some((c.declared, c.rendered, c.errors))
}

/// What the page's own self-check found in Chromium.
#[derive(Debug)]
pub(crate) struct PageCheck {
    pub declared: usize,
    pub rendered: usize,
    /// JS errors and console errors.
    pub errors: Vec<String>,
    /// Figures none of whose traces holds a finite number.
    pub empty: Vec<String>,
    /// Labels (ticks, titles, legend entries, annotations, slider labels) outside their figure.
    pub clipped: Vec<String>,
    /// How many visible labels the check measured.
    pub labels: usize,
    /// Legends and sliders whose box meets a plot area (sliders: also the x axis's labels).
    pub covered: Vec<String>,
    /// Every heat map as drawn: figure id, trace name, sum and count of its finite cells.
    pub heatmaps: Vec<(String, String, f64, usize)>,
}

/// A page a reader trusts at a glance: every declared figure drawn, none empty, no label clipped,
/// no JS error. Saves a screenshot at `shot`; returns what the check found.
pub(crate) fn assert_page_reads_well(report: &Path, shot: &Path) -> PageCheck {
    let c = check_page(report, shot).expect("chromium");
    eprintln!("{}: {c:?}", report.display());
    assert_eq!(
        c.rendered,
        c.declared,
        "{}: figures drawn",
        report.display()
    );
    assert!(
        c.errors.is_empty(),
        "{}: JS errors {:?}",
        report.display(),
        c.errors
    );
    assert!(
        c.empty.is_empty(),
        "{}: empty figures {:?}",
        report.display(),
        c.empty
    );
    assert!(
        c.clipped.is_empty(),
        "{}: clipped labels {:?}",
        report.display(),
        c.clipped
    );
    assert!(
        c.covered.is_empty(),
        "{}: legends or sliders over the data {:?}",
        report.display(),
        c.covered
    );
    // The check measured something: at least a few labels per figure.
    assert!(
        c.labels >= 3 * c.declared,
        "{}: only {} labels measured",
        report.display(),
        c.labels
    );
    c
}

pub(crate) fn check_page(report: &Path, shot: &Path) -> Option<PageCheck> {
    let bin = chromium()?;
    let html = std::fs::read_to_string(report).unwrap();
    let declared = declared_figures(&html);
    let profile = tempfile::tempdir().unwrap();
    let url = format!("file://{}", report.canonicalize().unwrap().display());
    let out = chrome(&bin, profile.path())
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dom = String::from_utf8_lossy(&out.stdout);
    let status = dom
        .split("id=\"gguf-trace-status\"")
        .nth(1)
        .expect("status element");
    let attr = |name: &str| -> String {
        let v = status
            .split(&format!("{name}=\""))
            .nth(1)
            .unwrap_or_else(|| panic!("the page did not finish its self-check ({name} missing)"));
        v.split('"')
            .next()
            .unwrap()
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
    };
    let rendered: usize = attr("data-rendered").parse().unwrap();
    let errors: Vec<String> = serde_json::from_str(&attr("data-errors")).unwrap();
    let empty: Vec<String> = serde_json::from_str(&attr("data-empty")).unwrap();
    let clipped: Vec<String> = serde_json::from_str(&attr("data-clipped")).unwrap();
    let labels: usize = attr("data-labels").parse().unwrap();
    let covered: Vec<String> = serde_json::from_str(&attr("data-covered")).unwrap();
    let heatmaps: Vec<serde_json::Value> = serde_json::from_str(&attr("data-heatmaps")).unwrap();
    let heatmaps = heatmaps
        .iter()
        .map(|h| {
            (
                h["id"].as_str().unwrap_or("").to_string(),
                h["name"].as_str().unwrap_or("").to_string(),
                h["sum"].as_f64().unwrap_or(f64::NAN),
                h["count"].as_u64().unwrap_or(0) as usize,
            )
        })
        .collect();
    let plots_in_dom = dom.matches("js-plotly-plot").count();
    assert!(plots_in_dom >= rendered);
    let profile2 = tempfile::tempdir().unwrap();
    let o = chrome(&bin, profile2.path())
        .arg(format!("--screenshot={}", shot.display()))
        .arg("--window-size=1300,1800")
        .arg(&url)
        .output()
        .unwrap();
    assert!(o.status.success() && shot.exists(), "no screenshot");
    Some(PageCheck {
        declared,
        rendered,
        errors,
        empty,
        clipped,
        labels,
        covered,
        heatmaps,
    })
}

/// The number of figures a report declares (`<meta name="gguf-trace-figures">`).
fn declared_figures(html: &str) -> usize {
    let v = html
        .split("name=\"gguf-trace-figures\" content=\"")
        .nth(1)
        .expect("the report declares its figures");
    v.split('"').next().unwrap().parse().unwrap()
}

fn assert_offline(html: &str) {
    for tag in ["<script", "<link"] {
        for part in html.split(tag).skip(1) {
            let head = &part[..part.find('>').unwrap_or(part.len())];
            for attr in ["src=", "href="] {
                if let Some(v) = head.split(attr).nth(1) {
                    let v = v.trim_start_matches(['"', '\'']);
                    assert!(
                        !v.starts_with("http") && !v.starts_with("//"),
                        "{tag} points at the network: {head}"
                    );
                }
            }
        }
    }
}

#[test]
fn report_of_real_runs_renders_offline_with_every_figure() {
    let model = require!(model_path(SMOL));
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let funnel = dir.path().join("funnel");
    let facts = dir.path().join("facts");
    trace_run(
        &model,
        &[
            "-f",
            s(&root.join("prompts/paraphrases.txt")),
            "-f",
            s(&root.join("prompts/unrelated.txt")),
        ],
        &funnel,
    );
    trace_run(
        &model,
        &[
            "-f",
            s(&root.join("prompts/facts.jsonl")),
            "--generate",
            "6",
        ],
        &facts,
    );
    let report = dir.path().join("report.html");
    let o = run_bin(&[
        "report",
        s(&funnel),
        s(&facts),
        "-o",
        s(&report),
        "--title",
        "test report",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let html = std::fs::read_to_string(&report).unwrap();
    assert_offline(&html);
    let declared = declared_figures(&html);
    // (plotly.min.js itself contains the string once; count the page body.)
    let body = html.split("<main>").nth(1).unwrap();
    assert_eq!(
        body.matches("Plotly.newPlot(").count(),
        declared,
        "one plot call per declared figure"
    );
    assert!(html.contains("MIT License"), "licence notice");
    // MathJax (2.1 MB) is not embedded: no figure typesets LaTeX. (plotly.js names MathJax in its
    // own code; `mjx-container` and `TexParser` are MathJax's.)
    assert!(
        !html.contains("mjx-container") && !html.contains("TexParser"),
        "MathJax is embedded"
    );
    assert_eq!(html.matches("<title>test report</title>").count(), 1);
    // plotly.js is embedded once, not once per figure.
    // (plotly.min.js alone is 4.65 MB; with MathJax the page was 2.1 MB larger.)
    assert!(html.len() < 6_500_000, "report is {} bytes", html.len());
    for csv in [
        "report.answers.csv",
        "report.metrics.csv",
        "report.groups.csv",
        "report.delta.csv",
    ] {
        assert!(dir.path().join(csv).exists(), "{csv}");
    }
    assert!(declared >= 20, "{declared}");
    // The contrast states its n and an interval, whatever it concludes.
    assert!(
        html.contains("vs <b>unrelated</b>. n = 12 vs 12. Peak at point")
            && html.contains("approximate 95% interval"),
        "the contrast's reading"
    );
    // Two runs: each per-run view is one section with a tab per run that has it.
    let nav = nav(&html);
    assert_eq!(nav.matches(">Trajectories</a>").count(), 1, "{nav}");
    assert!(!nav.contains("funnel — "), "no per-run copies: {nav}");
    assert_eq!(
        html.matches("class=\"pane\"").count(),
        html.matches("role=\"tab\"").count()
    );
    // The per-token heat map states its colour scale.
    assert!(
        html.contains("Colour scale"),
        "per-token colour scale stated"
    );
    assert_page_reads_well(&report, &shot_path(dir.path(), "report"));
}

/// A page's table of contents (its `<nav>`): one link per section.
pub(crate) fn nav(html: &str) -> &str {
    html.split("<nav>")
        .nth(1)
        .expect("the page has a <nav>")
        .split("</nav>")
        .next()
        .unwrap()
}

/// Where a page test saves its screenshot: beside the page, or into `$GGUF_TRACE_SHOTS/NAME.png`
/// when that is set (how the README's screenshots are made).
pub(crate) fn shot_path(dir: &Path, name: &str) -> PathBuf {
    match std::env::var_os("GGUF_TRACE_SHOTS") {
        Some(d) => {
            std::fs::create_dir_all(&d).unwrap();
            Path::new(&d).join(format!("{name}.png"))
        }
        None => dir.join(format!("{name}.png")),
    }
}

#[test]
fn report_of_2000_prompts_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("big");
    gguf_trace::run::synthetic::write(&run, 2000, 30, 576, &["a", "b", "c"], 7).unwrap();
    let report = dir.path().join("big.html");
    let t = std::time::Instant::now();
    let o = run_bin(&["report", s(&run), "-o", s(&report)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    eprintln!("report of 2000 prompts: {:.1} s", t.elapsed().as_secs_f64());
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(
        html.contains("Showing 286 of 2000 prompts"),
        "the drawing is thinned and says so"
    );
    // The CSV keeps every prompt: 2000 prompts × 31 points.
    let rows = std::fs::read_to_string(dir.path().join("big.metrics.csv"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(rows, 1 + 2000 * 31);
    let shot = dir.path().join("big.png");
    let (declared, rendered, errors) = require!(render_in_chromium(&report, &shot));
    assert_eq!(rendered, declared);
    assert!(errors.is_empty(), "console errors: {errors:?}");
}

/// Our PCA (covariance eigen-decomposition) agrees with numpy's SVD of the centred data.
#[test]
fn pca_of_a_real_run_agrees_with_numpy_svd() {
    let model = require!(model_path(SMOL));
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    trace_run(
        &model,
        &[
            "-f",
            s(&root.join("prompts/paraphrases.txt")),
            "--positions",
            "last",
        ],
        &run,
    );
    let r = gguf_trace::run::Run::open(&run).unwrap();
    let last = r.last().unwrap();
    let (n, p, d) = last.dim();
    let flat = last.view().into_shape_with_order((n * p, d)).unwrap();
    let pca = gguf_trace::analysis::pca::Pca::fit(flat, 3).unwrap();
    let code = r#"
import sys, json, numpy as np
x = np.load(sys.argv[1]).astype(np.float64)
x = x.reshape(-1, x.shape[-1]); x = x - x.mean(axis=0)
u, s, vt = np.linalg.svd(x, full_matrices=False)
var = s**2 / (len(x) - 1)
print(json.dumps({"ratio": (var[:3] / var.sum()).tolist(), "vt": vt[:3].tolist()}))
"#;
    let py: serde_json::Value =
        serde_json::from_str(&run_python(code, &[s(&run.join("last.npy"))])).unwrap();
    for c in 0..3 {
        let ratio = py["ratio"][c].as_f64().unwrap();
        assert!(
            (pca.explained_ratio[c] - ratio).abs() < 1e-6,
            "component {c}: {} vs numpy {ratio}",
            pca.explained_ratio[c]
        );
        let v: Vec<f64> = py["vt"][c]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let dot: f64 = v
            .iter()
            .zip(pca.components.row(c))
            .map(|(a, b)| a * b)
            .sum();
        assert!(
            dot.abs() > 1.0 - 1e-6,
            "component {c} differs from numpy's (|cos| = {})",
            dot.abs()
        );
    }
}

#[test]
fn report_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.html");
    // A directory that is not a run.
    let o = run_bin(&["report", s(dir.path()), "-o", s(&out)]);
    assert_clean_error(&o, "not a gguf-trace run directory", None);
    // An incomplete run.
    let run = dir.path().join("run");
    gguf_trace::run::synthetic::write(&run, 4, 3, 8, &["a"], 1).unwrap();
    let manifest = std::fs::read_to_string(run.join("run.json")).unwrap();
    std::fs::write(
        run.join("run.json"),
        manifest.replace("\"complete\": true", "\"complete\": false"),
    )
    .unwrap();
    let o = run_bin(&["report", s(&run), "-o", s(&out)]);
    assert_clean_error(&o, "incomplete run", None);
    // A run with no prompts.
    let mut m: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    m["prompts"] = serde_json::json!([]);
    std::fs::write(run.join("run.json"), serde_json::to_string(&m).unwrap()).unwrap();
    let o = run_bin(&["report", s(&run), "-o", s(&out)]);
    assert_clean_error(&o, "has no prompts", None);
    // A missing directory, and an output that is a directory.
    let o = run_bin(&["report", s(&dir.path().join("nope")), "-o", s(&out)]);
    assert_clean_error(&o, "not a gguf-trace run directory", None);
    assert!(!out.exists());
}
