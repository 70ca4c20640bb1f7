//! Deliberately fragmented loop images: an ext4 image whose backing file has thousands of
//! extents, so that its reflink clone takes seconds (≈35 µs per extent on XFS).
//!
//! How: the image is made and fully allocated, reflink-cloned to a scratch copy (so every block
//! is shared), then every other 4 KiB block is rewritten with its own bytes. Each rewrite is a
//! copy-on-write into a new extent; the data is unchanged. The scratch copy is removed.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::{check, tool};

/// Makes `image` (which must not exist, on a reflink filesystem): an ext4 filesystem of
/// `size_mb` MiB whose file has about `size_mb * 256 / every` extents. Returns the extent count.
pub fn fragmented_ext4(image: &Path, size_mb: u64, every: u64) -> u64 {
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(image)
        .unwrap_or_else(|e| panic!("create {}: {e}", image.display()));
    file.set_len(size_mb << 20).expect("size the image");
    drop(file);
    check(tool("mkfs.ext4").args(["-q", "-F"]).arg(image));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .expect("open the image");
    // Allocate every hole (data kept): the clone below then shares every block.
    // SAFETY: a valid descriptor; mode 0 allocates without changing the contents.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, (size_mb << 20) as libc::off_t) };
    assert_eq!(rc, 0, "fallocate {}", image.display());
    file.sync_all().expect("fsync the image");
    let copy = image.with_extension("fragmenting");
    quiesce_agent::reflink::clone_file(image, &copy).expect("clone the image");
    let mut block = vec![0u8; 4096];
    let mut offset = 0;
    while offset < size_mb << 20 {
        file.read_exact_at(&mut block, offset)
            .expect("read a block");
        file.write_all_at(&block, offset).expect("rewrite a block");
        offset += 4096 * every;
    }
    file.sync_all().expect("fsync the image");
    fs::remove_file(&copy).expect("remove the scratch clone");
    quiesce_agent::reflink::extent_count(&file).expect("FIEMAP")
}
