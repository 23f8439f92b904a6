//! Facts about the machine that need a system call: free disk space. (`bitnet doctor`.)

use std::io;
use std::path::Path;

/// Bytes available to an unprivileged user on the filesystem holding `path`.
#[cfg(unix)]
pub fn disk_free(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    #[allow(unsafe_code)]
    // SAFETY: `c` is a NUL-terminated path and `st` points to writable memory the size of
    // `statvfs`; the call fills it on success (checked before reading).
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(unsafe_code)]
    // SAFETY: statvfs returned 0, so it initialised the struct.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (u32 on some 32-bit targets).
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Not available off Unix.
#[cfg(not(unix))]
pub fn disk_free(_path: &Path) -> io::Result<u64> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "statvfs"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_free_space() {
        let free = super::disk_free(std::path::Path::new("/")).unwrap();
        assert!(free > 0);
        assert!(super::disk_free(std::path::Path::new("/no/such/dir")).is_err());
    }
}
