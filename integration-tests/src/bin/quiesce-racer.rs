//! `quiesce-racer DIR NAME TARGET`: swaps the directory `DIR/NAME` for a symbolic link to
//! `TARGET` and back, as fast as it can, until killed — the attack of a local user who can
//! write `DIR` on a path the agent is about to open. The real directory is parked at
//! `DIR/.NAME.real` while the link is in place; the test puts it back after killing the racer.

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let (Some(dir), Some(name), Some(target)) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: quiesce-racer DIR NAME TARGET");
        std::process::exit(64);
    };
    let link = dir.join(&name);
    let real = dir.join(format!(".{}.real", name.display()));
    let mut swaps: u64 = 0;
    loop {
        if std::fs::rename(&link, &real).is_err() {
            eprintln!("quiesce-racer: cannot move {} away", link.display());
            std::process::exit(1);
        }
        if std::os::unix::fs::symlink(&target, &link).is_ok() {
            // Leave the link in place a moment: long enough for a lookup to land on it.
            std::thread::yield_now();
            let _ = std::fs::remove_file(&link);
        }
        if std::fs::rename(&real, &link).is_err() {
            eprintln!("quiesce-racer: cannot put {} back", link.display());
            std::process::exit(1);
        }
        std::thread::yield_now();
        swaps += 1;
        if swaps.is_multiple_of(100_000) {
            println!("{swaps}");
        }
    }
}
