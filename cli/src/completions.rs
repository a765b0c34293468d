//! `jfs completions SHELL`: the shell's completion script for jfs, generated from the same clap
//! definitions that parse the command line (so it offers exactly the subcommands and flags jfs has).

use std::io::Write;

use clap::ValueEnum;

use crate::{CliError, CliResult};

/// The shells `jfs completions` writes a script for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// The completion script for `shell`.
pub fn script(shell: Shell, mut cmd: clap::Command) -> Vec<u8> {
    let mut buf = Vec::new();
    let name = cmd.get_name().to_string();
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut cmd, name, &mut buf);
    buf
}

/// Writes the script to stdout; a closed stdout (`| head`) is not an error.
pub fn print(shell: Shell, cmd: clap::Command) -> CliResult<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(&script(shell, cmd)).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::Failed(format!("cannot write the completion script: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_naming_the_subcommands() {
        let cmd = || {
            clap::Command::new("jfs")
                .subcommand(clap::Command::new("metastatus"))
                .subcommand(clap::Command::new("fsck"))
        };
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let s = String::from_utf8(script(shell, cmd())).unwrap();
            assert!(s.contains("metastatus") && s.contains("fsck"), "{shell:?}: {s}");
        }
    }
}
