//! The one place kiln memory-maps a file.

use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

/// The capability to memory-map input files.
///
/// Every reader that maps a file takes a `&MmapAccess`, so the decision to accept the risk of
/// mapping is made once, visibly, by whoever constructs it.
#[derive(Debug, Clone, Copy)]
pub struct MmapAccess {
    _private: (),
}

impl MmapAccess {
    /// Grants the capability to memory-map input files.
    ///
    /// # Safety
    ///
    /// A memory map exposes the file's current contents without copying them. If another process
    /// truncates a mapped file while kiln reads it, the next access to a vanished page raises
    /// SIGBUS and the process dies; if another process rewrites it in place, kiln may read a mix
    /// of old and new bytes (a torn read), which can produce a wrong artifact rather than an
    /// error. The caller must ensure that input files are not modified or truncated while kiln
    /// runs, or accept those outcomes.
    #[allow(unsafe_code)]
    pub unsafe fn new() -> MmapAccess {
        MmapAccess { _private: () }
    }
}

/// A read-only memory map of a whole file.
#[derive(Debug)]
pub struct MappedFile {
    map: Option<Mmap>,
}

impl MappedFile {
    /// Maps `path` read-only. An empty file gives an empty slice (mapping zero bytes is an error on
    /// most platforms, so nothing is mapped).
    pub fn open(_access: &MmapAccess, path: &Path) -> std::io::Result<MappedFile> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        if len == 0 {
            return Ok(MappedFile { map: None });
        }
        // SAFETY: the caller holds an `MmapAccess`, whose constructor documents and accepts the
        // risk of concurrent modification (SIGBUS or torn reads). The map is read-only and private
        // to this process, and nothing in kiln writes to input files.
        #[allow(unsafe_code)]
        let map = unsafe { Mmap::map(&file)? };
        Ok(MappedFile { map: Some(map) })
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Tells the kernel that kiln is done with `range` for now, so its pages leave this process's
    /// resident set. Reading the range again faults the pages back in from the file, so this never
    /// changes what kiln reads; it keeps peak memory proportional to the tensors in flight rather
    /// than to the checkpoint. Failures are ignored: this is advice.
    pub fn release(&self, start: usize, len: usize) {
        let Some(map) = &self.map else { return };
        if len == 0 || start.checked_add(len).is_none_or(|end| end > map.len()) {
            return;
        }
        #[cfg(unix)]
        {
            // SAFETY: `MADV_DONTNEED` on a read-only file-backed mapping drops clean page-cache
            // pages from this mapping only; later reads re-fault the same file contents. No private
            // writes exist that could be lost, because the map is never writable.
            #[allow(unsafe_code)]
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len)
            };
        }
    }
}
