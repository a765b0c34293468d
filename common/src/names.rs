//! What a file name may be, checked the same way by the client (before a
//! request leaves) and by metad (the authority).

use crate::FsError;

/// Longest name component in bytes (Linux NAME_MAX).
pub const NAME_MAX: usize = 255;

/// One name component: 1..=255 bytes, no `/` and no NUL.
pub fn check_name(name: &[u8]) -> Result<(), FsError> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(FsError::InvalidArgument(format!(
            "{:?} is not a valid file name (names are 1-255 bytes without '/' or NUL)",
            String::from_utf8_lossy(name)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_checked() {
        assert!(check_name(b"ok").is_ok());
        assert_eq!(check_name(&[b'x'; 256]), Err(FsError::NameTooLong));
        assert!(check_name(&[b'x'; 255]).is_ok());
        assert!(matches!(check_name(b"a/b"), Err(FsError::InvalidArgument(_))));
        assert!(matches!(check_name(b"a\0b"), Err(FsError::InvalidArgument(_))));
        assert!(matches!(check_name(b""), Err(FsError::InvalidArgument(_))));
    }
}
