//! The man pages in man/ and the shell completions: the generated pages equal what the programs
//! print now (so they follow every flag change), every page renders with man(1) and lints clean
//! with mandoc and groff, cross-references point at pages that exist, jfs.toml(5) documents
//! exactly the config keys the code accepts (with the code's defaults and ranges), mount.jfs(8)
//! every mount option and helper flag, and `jfs completions` gives scripts that work in bash.
//!
//! No cluster needed; the programs come from JFS_BIN_DIR like in every other test.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use jfs_common::config::{known_keys, Config};
use jfs_tests::*;

fn man_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../man")
}

/// Every page in man/: NAME.SECTION with section 1, 5 or 8.
fn pages() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(man_dir())
        .expect("man/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("1" | "5" | "8")))
        .collect();
    v.sort();
    assert!(v.len() >= 12, "expected at least 12 pages in man/, found {v:?}");
    v
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

fn run(cmd: &mut Command) -> CmdOut {
    run_cmd(cmd, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"))
}

/// Roff text as read: fonts dropped, escapes resolved.
fn plain(roff: &str) -> String {
    roff.replace("\\fB", "")
        .replace("\\fI", "")
        .replace("\\fR", "")
        .replace("\\fP", "")
        .replace("\\-", "-")
        .replace("\\(dq", "\"")
        .replace("\\(aq", "'")
        .replace("\\&", "")
        .replace("\\%", "")
        .replace("\\e", "\\")
}

/// The text of a `.B`/`.BI`/`.BR` line or a text line, as it prints.
fn line_text(line: &str) -> String {
    match line.split_once(' ') {
        Some((m, rest)) if m.starts_with('.') => plain(&rest.replace('"', "")).replace(' ', ""),
        _ => plain(line),
    }
}

/// Tag lines (the line after each `.TP`) between `.SH FROM` and the next `.SH`, with the line
/// after each tag.
fn tags(page: &str, section: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = page.lines().collect();
    let mut out = Vec::new();
    let mut inside = false;
    for (i, l) in lines.iter().enumerate() {
        if let Some(h) = l.strip_prefix(".SH ") {
            inside = h.trim_matches('"') == section;
        } else if inside && *l == ".TP" && i + 2 < lines.len() {
            out.push((lines[i + 1].to_string(), lines[i + 2].to_string()));
        }
    }
    out
}

#[test]
fn generated_pages_equal_what_the_programs_print_now() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(Command::new("bash")
        .arg(man_dir().join("generate.sh"))
        .arg(tmp.path())
        .env("JFS_BIN_DIR", bin_dir()));
    assert!(out.success(), "man/generate.sh failed: {}", out.describe());
    let mut generated = 0;
    for src in std::fs::read_dir(man_dir().join("src")).unwrap() {
        let src = src.unwrap().path();
        let Some(page) = src
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".in"))
        else {
            continue;
        };
        let fresh = read(&tmp.path().join(page));
        let committed = std::fs::read_to_string(man_dir().join(page)).unwrap_or_default();
        if fresh != committed {
            let (n, (want, got)) = fresh
                .lines()
                .chain(std::iter::repeat("<end of file>"))
                .zip(committed.lines().chain(std::iter::repeat("<end of file>")))
                .enumerate()
                .find(|(_, (a, b))| a != b)
                .unwrap();
            panic!(
                "man/{page} differs from what the programs print now (line {}: committed {got:?}, now {want:?}); \
                 run `bash man/generate.sh` after building, and commit man/",
                n + 1
            );
        }
        generated += 1;
    }
    assert!(generated >= 10, "only {generated} templates in man/src");
}

#[test]
fn every_page_renders_with_man_and_lints_clean() {
    assert!(
        Command::new("mandoc").arg("-V").output().is_ok(),
        "mandoc is not installed (scripts/install-deps.sh installs it)"
    );
    for p in pages() {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let out = run(Command::new("man")
            .args(["--warnings", "-l"])
            .arg(&p)
            .env("MANWIDTH", "80")
            .env("MANPAGER", "cat")
            .env("PAGER", "cat"));
        assert!(
            out.success() && out.stderr.trim().is_empty(),
            "man -l {name}: {}",
            out.describe()
        );
        assert!(
            out.stdout.lines().count() > 20,
            "man -l {name} printed almost nothing: {}",
            out.stdout
        );
        for section in ["NAME", "SYNOPSIS", "DESCRIPTION", "EXIT STATUS", "EXAMPLES", "SEE ALSO"] {
            if name == "jfs.toml.5" && section == "EXIT STATUS" {
                continue;
            }
            assert!(
                out.stdout.lines().any(|l| l == section),
                "{name} has no {section} section"
            );
        }
        let out = run(Command::new("mandoc").args(["-T", "lint"]).arg(&p));
        assert!(
            out.success() && out.stdout.trim().is_empty() && out.stderr.trim().is_empty(),
            "mandoc -T lint {name}: {}",
            out.describe()
        );
        let out = run(Command::new("groff").args(["-ww", "-z", "-man"]).arg(&p));
        assert!(
            out.success() && out.stderr.trim().is_empty(),
            "groff -ww -z -man {name}: {}",
            out.describe()
        );
    }
}

#[test]
fn references_to_jfs_pages_name_pages_that_exist() {
    let have: BTreeSet<String> = pages()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    for p in pages() {
        for line in read(&p).lines() {
            // `.BR jfs\-admin (1),` and the command index's `See .BR jfs\-admin (1).`
            let Some(rest) = line.strip_prefix(".BR ") else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let (Some(name), Some(sec)) = (words.next(), words.next()) else {
                continue;
            };
            let name = plain(name).trim_matches('"').to_string();
            let Some(sec) = sec.strip_prefix('(').and_then(|s| s.get(..1)) else {
                continue;
            };
            if name.starts_with("jfs") || name == "mount.jfs" {
                let target = format!("{name}.{sec}");
                assert!(
                    have.contains(&target),
                    "{} refers to {name}({sec}), but man/{target} does not exist",
                    p.display()
                );
            }
        }
    }
}

/// One key of jfs.toml(5): `\fBKEY\fR = DEFAULT` and the first line of its text (`Integer, A to B.`).
struct DocKey {
    key: String,
    default: Option<String>,
    kind: String,
}

fn documented_keys() -> Vec<DocKey> {
    let page = read(&man_dir().join("jfs.toml.5"));
    tags(&page, "KEYS")
        .into_iter()
        .map(|(tag, body)| {
            let tag = plain(&tag);
            let (key, default) = match tag.split_once(" = ") {
                Some((k, d)) => (k.trim().to_string(), Some(d.trim().to_string())),
                None => (tag.trim().to_string(), None),
            };
            DocKey {
                key,
                default,
                kind: plain(&body),
            }
        })
        .collect()
}

fn parse(text: &str) -> Result<Config, String> {
    Config::from_toml_str(text, Path::new("jfs.toml")).map_err(|e| e.to_string())
}

#[test]
fn jfs_toml_5_documents_exactly_the_keys_the_code_accepts() {
    let doc = documented_keys();
    let documented: BTreeSet<&str> = doc.iter().map(|k| k.key.as_str()).collect();
    let accepted: BTreeSet<&str> = known_keys().collect();
    let undocumented: Vec<_> = accepted.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&accepted).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "man/jfs.toml.5 and common/src/config.rs disagree: keys the code accepts but the page does not \
         document: {undocumented:?}; keys the page documents but the code refuses: {unknown:?}"
    );
    assert_eq!(doc.len(), documented.len(), "a key is documented twice in jfs.toml.5");

    // The documented defaults are the code's: a file that sets every key to its documented
    // default reads as no file at all.
    let mut text = String::new();
    for k in &doc {
        if let Some(d) = &k.default {
            text.push_str(&format!("{} = {d}\n", k.key));
        }
    }
    let from_page = parse(&text).unwrap_or_else(|e| panic!("the documented defaults do not parse: {e}\n{text}"));
    assert!(
        from_page == Config::default(),
        "the defaults in jfs.toml.5 differ from `impl Default for Config`:\npage: {from_page:#?}\ncode: {:#?}",
        Config::default()
    );

    // The documented ranges are the code's: both ends are accepted, one beyond is refused.
    for k in &doc {
        let Some(rest) = k.kind.strip_prefix("Integer, ") else {
            continue;
        };
        let num = |s: &str| -> u64 {
            s.trim_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .unwrap_or_else(|_| panic!("jfs.toml.5, {}: cannot read a number in {:?}", k.key, k.kind))
        };
        let (min, max) = if let Some((a, b)) = rest.split_once(" to ") {
            (num(a), Some(num(b.split(|c| c == ',' || c == ' ').next().unwrap())))
        } else if let Some(a) = rest.strip_suffix(" or more.") {
            (num(a), None)
        } else {
            panic!(
                "jfs.toml.5, {}: expected `Integer, MIN to MAX.` or `Integer, MIN or more.`, got {:?}",
                k.key, k.kind
            );
        };
        let ok = |v: u64| parse(&format!("{} = {v}\n", k.key));
        ok(min).unwrap_or_else(|e| panic!("jfs.toml.5 says {} may be {min}, the code refuses it: {e}", k.key));
        if min > 0 {
            assert!(
                ok(min - 1).is_err(),
                "jfs.toml.5 says {} is at least {min}, the code takes {}",
                k.key,
                min - 1
            );
        }
        if let Some(max) = max {
            ok(max).unwrap_or_else(|e| panic!("jfs.toml.5 says {} may be {max}, the code refuses it: {e}", k.key));
            assert!(
                ok(max + 1).is_err(),
                "jfs.toml.5 says {} is at most {max}, the code takes {}",
                k.key,
                max + 1
            );
        }
    }
}

#[test]
fn mount_jfs_8_documents_every_mount_option_and_helper_flag() {
    let page = read(&man_dir().join("mount.jfs.8"));
    let documented: Vec<String> = tags(&page, "MOUNT OPTIONS").iter().map(|(t, _)| line_text(t)).collect();
    // The daemon names every option it understands when it refuses one.
    let tmp = tempfile::tempdir().unwrap();
    let out = run(Command::new(bin("jfs-mountd"))
        .args(["-o", "no_such_option_x", "default"])
        .arg(tmp.path()));
    assert_eq!(
        out.status.code(),
        Some(2),
        "jfs-mountd with an unknown option: {}",
        out.describe()
    );
    let list = out
        .stderr
        .split_once("jfs understands ")
        .and_then(|(_, l)| l.split_once(')'))
        .map(|(l, _)| l.to_string())
        .unwrap_or_else(|| {
            panic!(
                "jfs-mountd no longer lists its options when refusing one: {}",
                out.describe()
            )
        });
    for opt in list.split(", ") {
        assert!(
            documented.iter().any(|d| d == opt),
            "mount option {opt} (jfs-mountd understands it) is not under MOUNT OPTIONS in mount.jfs.8 ({documented:?})"
        );
    }
    // The helper's flags, from its own --help.
    let link = tmp.path().join("mount.jfs");
    std::os::unix::fs::symlink(bin("jfs-mountd"), &link).unwrap();
    let out = run(Command::new(&link).arg("--help"));
    assert!(out.success(), "mount.jfs --help: {}", out.describe());
    let flags: Vec<String> = tags(&page, "OPTIONS").iter().map(|(t, _)| line_text(t)).collect();
    for line in out.stdout.lines().map(str::trim) {
        let Some(flag) = line.strip_prefix('-').and_then(|f| f.get(..1)) else {
            continue;
        };
        if flag == "h" || flag == "V" {
            continue;
        }
        assert!(
            flags.iter().any(|f| f.starts_with(&format!("-{flag}"))),
            "mount.jfs flag -{flag} ({line}) is not under OPTIONS in mount.jfs.8 ({flags:?})"
        );
    }
}

#[test]
fn bash_completion_loads_and_completes_subcommands() {
    let jfs = bin("jfs");
    let out = run(Command::new("bash").arg("-c").arg(format!(
        "source <('{}' completions bash) && complete -p jfs",
        jfs.display()
    )));
    assert!(
        out.success() && out.stdout.contains("jfs"),
        "the bash completion script does not load: {}",
        out.describe()
    );
    // Drive the completion function as bash does when TAB is pressed.
    let complete = |words: &[&str]| -> Vec<String> {
        let script = format!(
            r#"source <('{jfs}' completions bash) || exit 3
func=$(complete -p jfs | sed -E 's/.* -F ([^ ]+) .*/\1/')
COMP_WORDS=({words})
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
COMP_LINE="${{COMP_WORDS[*]}}"
COMP_POINT=${{#COMP_LINE}}
"$func" jfs "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\n' "${{COMPREPLY[@]}}""#,
            jfs = jfs.display(),
            words = words.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" ")
        );
        let out = run(Command::new("bash").arg("-c").arg(&script));
        assert!(out.success(), "completing {words:?}: {}", out.describe());
        out.stdout.lines().map(|l| l.trim().to_string()).collect()
    };
    let got = complete(&["jfs", "met"]);
    assert!(
        got.iter().any(|w| w == "metastatus"),
        "`jfs met<TAB>` offers {got:?}, not metastatus"
    );
    let got = complete(&["jfs", ""]);
    for sub in ["local", "metastatus", "admin", "fs", "fsck", "completions"] {
        assert!(
            got.iter().any(|w| w == sub),
            "`jfs <TAB>` offers {got:?}, without {sub}"
        );
    }
    let got = complete(&["jfs", "admin", "node", ""]);
    for sub in ["add", "remove", "replace", "health"] {
        assert!(
            got.iter().any(|w| w == sub),
            "`jfs admin node <TAB>` offers {got:?}, without {sub}"
        );
    }
    let got = complete(&["jfs", "completions", ""]);
    for sh in ["bash", "zsh", "fish"] {
        assert!(
            got.iter().any(|w| w == sh),
            "`jfs completions <TAB>` offers {got:?}, without {sh}"
        );
    }
}

#[test]
fn zsh_and_fish_completions_are_generated() {
    for (shell, checker) in [("zsh", ["zsh", "-n"]), ("fish", ["fish", "--no-execute"])] {
        let out = run(Command::new(bin("jfs")).args(["completions", shell]));
        assert!(
            out.success() && out.stdout.contains("metastatus") && out.stdout.contains("jfs"),
            "jfs completions {shell}: {}",
            out.describe()
        );
        // Syntax-check it where the shell is installed (it need not be).
        if Command::new(checker[0]).arg("--version").output().is_ok() {
            let tmp = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(tmp.path(), &out.stdout).unwrap();
            let check = run(Command::new(checker[0]).arg(checker[1]).arg(tmp.path()));
            assert!(
                check.success(),
                "{} {} on the {shell} script: {}",
                checker[0],
                checker[1],
                check.describe()
            );
        }
    }
    let out = run(Command::new(bin("jfs")).args(["completions", "tcsh"]));
    assert_eq!(out.status.code(), Some(2), "jfs completions tcsh: {}", out.describe());
}
