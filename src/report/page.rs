//! Lays the sections out as one self-contained HTML page (minijinja template `page.html`).

use minijinja::{context, Environment};

use super::view::RunView;
use super::Section;

const TEMPLATE: &str = include_str!("page.html");

const LICENCES: &str = "plotly.js (https://plot.ly) — MIT License, Copyright (c) 2016-2024 Plotly Technologies Inc. \
Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated documentation files, \
to deal in the Software without restriction, including without limitation the rights to use, copy, modify, merge, publish, distribute, \
sublicense, and/or sell copies of the Software, subject to the condition that the above copyright notice and this permission notice \
shall be included in all copies or substantial portions of the Software. THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND.\n\
Embedded through the plotly Rust crate (MIT License).";

/// plotly.js as one inline `<script>` element. The plotly crate's offline sources are plotly.js
/// followed by MathJax (2.1 MB), which only typesets LaTeX in titles — no figure here has any — so
/// only the first element is embedded. (plotly.min.js never holds the text `</script>`, or it
/// could not be inlined at all.)
pub fn plotly_script() -> String {
    let all = plotly::Plot::offline_js_sources();
    const END: &str = "</script>";
    match all.find(END) {
        Some(i) => all[..i + END.len()].to_string(),
        None => all,
    }
}

pub struct PageInput<'a> {
    pub title: &'a str,
    pub views: &'a [RunView],
    pub sections: &'a [Section],
    pub csv_files: Vec<String>,
}

/// Number of figures a page declares (and the browser test counts).
pub fn n_figures(sections: &[Section]) -> usize {
    sections
        .iter()
        .map(|s| s.figures.len() + s.tabs.iter().map(|t| t.figures.len()).sum::<usize>())
        .sum()
}

pub fn render(input: &PageInput) -> Result<String, minijinja::Error> {
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
    env.add_template("page", TEMPLATE)?;
    let mut fig_no = 0usize;
    let sections: Vec<_> = input
        .sections
        .iter()
        .map(|s| {
            let mut figs = |figures: &[super::Figure]| -> Vec<_> {
                figures
                    .iter()
                    .map(|f| {
                        fig_no += 1;
                        context! { title => f.title, caption => f.caption, html => f.plot.to_inline_html(Some(&format!("fig{fig_no}"))) }
                    })
                    .collect()
            };
            let figures = figs(&s.figures);
            let tabs: Vec<_> = s
                .tabs
                .iter()
                .map(|t| context! { run => t.run, note => t.note, figures => figs(&t.figures) })
                .collect();
            context! { title => s.title, note => s.note, figures => figures, tabs => tabs }
        })
        .collect();
    let runs: Vec<_> = input
        .views
        .iter()
        .map(|v| {
            let m = &v.run.manifest;
            context! {
                dir => v.shown_dir,
                model => m.model.file_name,
                arch => m.model.architecture,
                file_type => m.model.file_type,
                mix => m.model.tensor_mix(),
                n_layer => m.model.n_layer,
                n_embd => m.model.n_embd,
                n_prompts => m.prompts.len(),
                positions => format!("{:?}", m.capture.positions).to_lowercase(),
                pca => v.pca.explained_ratio.iter().map(|r| format!("{:.1}%", 100.0 * r)).collect::<Vec<_>>().join(", "),
            }
        })
        .collect();
    env.get_template("page")?.render(context! {
        title => input.title,
        version => env!("CARGO_PKG_VERSION"),
        created => chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        n_figures => n_figures(input.sections),
        plotly_js => minijinja::Value::from_safe_string(plotly_script()),
        runs => runs,
        sections => sections,
        csv_files => input.csv_files,
        licences => LICENCES,
    })
}
