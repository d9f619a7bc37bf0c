//! The CLI's stdout as a shell sees it.
//!
//! The help text, which clap writes itself: each subcommand's its own.

use std::process::{Command, Stdio};

fn nightshift(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nightshift"));
    c.args(args).stderr(Stdio::piped()).stdin(Stdio::null());
    c
}

fn help(args: &[&str]) -> String {
    let out = nightshift(args).output().expect("running nightshift");
    assert!(out.status.success(), "nightshift {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

#[test]
fn plan_and_report_help_each_describe_their_own_command() {
    let plan = help(&["plan", "--help"]);
    assert!(
        plan.contains("what the daemon intends to do with its queue"),
        "{plan}"
    );
    assert!(!plan.contains("Spend and savings"), "{plan}");
    let report = help(&["report", "--help"]);
    assert!(
        report.contains("Spend and savings of finished jobs"),
        "{report}"
    );
    assert!(!report.contains("intends to do"), "{report}");
    // The overview lists each with its own summary.
    let all = help(&["--help"]);
    let line = |name: &str| {
        all.lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no '{name}' in\n{all}"))
            .to_string()
    };
    assert!(line("plan").contains("intends to do"), "{all}");
    assert!(line("report").contains("Spend and savings"), "{all}");
}
