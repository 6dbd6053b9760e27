package cowfs

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/opencontainers/go-digest"
)

// WriteUpperTar writes a container's overlay upper directory as a layer tar (the OCI layer
// format): its files with owners, modes and xattrs, its whiteouts (character devices 0/0) as
// they are, and every opaque directory (trusted.overlay.opaque=y) as an extra ".wh..wh..opq"
// entry. ExtractUpper turns such a tar back into an upper directory that an overlay mount
// shows exactly as the original. The upper must not change while it is written (the
// container is frozen or dumped).
func WriteUpperTar(ctx context.Context, w io.Writer, upper string) error {
	if err := writeDirTar(ctx, w, upper, true); err != nil {
		return fmt.Errorf("archive upper layer %s: %w", upper, err)
	}
	return nil
}

// ExtractUpper unpacks a tar written by WriteUpperTar (or any layer tar) into dir, a new
// empty directory, with the checks of a layer import: no entry escapes dir, symlinks are
// never followed, whiteouts and opaque markers become overlay whiteouts and opaque
// directories. It returns the digest of the tar bytes read, which the caller compares with
// the digest the sender announced before using dir.
func ExtractUpper(ctx context.Context, r io.Reader, dir string) (digest.Digest, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("extract upper layer into %s: %w", dir, err)
	}
	d, _, err := extractLayer(ctx, r, dir, nil)
	if err != nil {
		return "", fmt.Errorf("extract upper layer into %s: %w", dir, err)
	}
	return d, nil
}
