//! The Layout section of `gateway/lib.rs` is a claim about dependencies; this test holds
//! the code to it: every `crate::MODULE` a module's files name must be one it may use.

use std::collections::BTreeSet;
use std::path::Path;

/// Each module and the modules it may use (the layers of lib.rs's Layout).
const ALLOWED: &[(&str, &[&str])] = &[
    ("receipt", &[]),
    ("burst", &[]),
    ("limit", &[]),
    ("model", &["receipt"]),
    ("config", &["model", "limit"]),
    ("summary", &["config", "model"]),
    ("buffer", &["config", "model", "receipt", "summary"]),
    ("broker", &["burst", "config", "model", "receipt"]),
    ("serial", &["config", "model"]),
    ("sip2", &["config", "model"]),
    ("live", &["buffer", "config", "model", "summary"]),
    (
        "intake",
        &[
            "buffer", "burst", "config", "limit", "model", "receipt", "summary",
        ],
    ),
    ("upstream", &["buffer", "burst", "config", "model"]),
    (
        "commands",
        &["broker", "buffer", "burst", "config", "model", "serial"],
    ),
    (
        "api",
        &[
            "buffer", "burst", "config", "intake", "live", "model", "summary", "upstream",
        ],
    ),
    ("service", &["broker", "buffer", "model"]),
];

fn sources(root: &Path, module: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let file = root.join(format!("{module}.rs"));
    if file.exists() {
        out.push(file);
    }
    let mut dirs = vec![root.join(module)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out
}

/// The modules named as `crate::NAME` in `text`.
fn named(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

#[test]
fn modules_use_only_what_the_layout_allows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway");
    let mut wrong = Vec::new();
    for (module, allowed) in ALLOWED {
        let files = sources(&root, module);
        assert!(!files.is_empty(), "no source for module {module}");
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for used in named(&text) {
                if used != *module && !allowed.contains(&used.as_str()) {
                    wrong.push(format!("{} uses crate::{used}", f.display()));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "outside the Layout:\n{}",
        wrong.join("\n")
    );
}
