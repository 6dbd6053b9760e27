package cowfs

import (
	"fmt"
	"strings"
)

// NormalizeName turns "name" into "name:latest" and checks that name:tag is a plausible
// image reference: lower-case name components of [a-z0-9._-] separated by '/', an optional
// registry host (which may carry a port) in front, a tag of [A-Za-z0-9_.-], at most 128 chars.
func NormalizeName(ref string) (string, error) {
	if ref == "" {
		return "", fmt.Errorf("empty image name")
	}
	if strings.Contains(ref, "@") {
		return "", fmt.Errorf("image name %q: digests are not names; use the digest itself", ref)
	}
	name, tag := ref, "latest"
	if i := strings.LastIndex(ref, ":"); i > strings.LastIndex(ref, "/") {
		name, tag = ref[:i], ref[i+1:]
	}
	if name == "" {
		return "", fmt.Errorf("image name %q: empty name before the tag", ref)
	}
	if tag == "" || len(tag) > 128 || !validChars(tag, "_.-", true) || tag[0] == '.' || tag[0] == '-' {
		return "", fmt.Errorf("image name %q: tag %q must be 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'", ref, tag)
	}
	parts := strings.Split(name, "/")
	for i, p := range parts {
		if i == 0 && len(parts) > 1 && (strings.ContainsAny(p, ".:") || p == "localhost") {
			if !validChars(p, ".-:", true) || strings.ContainsAny(p[:1], ".-:") {
				return "", fmt.Errorf("image name %q: bad registry host %q", ref, p)
			}
			continue
		}
		if p == "" || !validChars(p, "._-", false) || strings.ContainsAny(p[:1], "._-") {
			return "", fmt.Errorf("image name %q: component %q must be lower-case [a-z0-9._-], starting with a letter or digit", ref, p)
		}
	}
	return name + ":" + tag, nil
}

func validChars(s, extra string, upper bool) bool {
	for _, c := range s {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case upper && c >= 'A' && c <= 'Z':
		case strings.ContainsRune(extra, c):
		default:
			return false
		}
	}
	return true
}
