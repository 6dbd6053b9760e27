package migrate

import (
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"

	"github.com/hotctl/hot/checkpoint"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// API paths of the agent. Every request carries "Authorization: Bearer TOKEN".
const (
	PathPreflight = "/v1/preflight"  // POST PreflightRequest → PreflightResponse
	PathImage     = "/v1/image"      // POST an OCI archive (cowfs.Store.Export) → ImageResponse
	PathMigration = "/v1/migrations" // POST the migration stream (a tar, see Manifest) → Result
)

// maxAnswerSize bounds JSON bodies read into memory.
const maxAnswerSize = 16 << 20

// HostFacts are what preflight compares between the two hosts.
type HostFacts struct {
	CRIUVersion string   `json:"criuVersion"`
	Kernel      string   `json:"kernel"`
	Arch        string   `json:"arch"`
	CPUFlags    []string `json:"cpuFlags"`
}

// PreflightRequest is what the source asks before anything is stopped.
type PreflightRequest struct {
	Name    string          `json:"name"`
	Image   string          `json:"image"`
	ImageID digest.Digest   `json:"imageId"`
	DiffIDs []digest.Digest `json:"diffIds"`
	IP      netip.Addr      `json:"ip,omitzero"`
	Bridge  string          `json:"bridge,omitempty"`
	Subnet  netip.Prefix    `json:"subnet,omitzero"`
	Lazy    bool            `json:"lazy,omitempty"`
	Source  HostFacts       `json:"source"`
}

// PreflightResponse is the target's verdict. Problems is empty when the migration may go on;
// MissingLayers (diffIDs) say what the source must push first.
type PreflightResponse struct {
	Target        HostFacts       `json:"target"`
	HaveImage     bool            `json:"haveImage"`
	MissingLayers []digest.Digest `json:"missingLayers,omitempty"`
	Problems      []string        `json:"problems,omitempty"`
}

// ImageResponse answers a pushed image.
type ImageResponse struct {
	ImageID digest.Digest `json:"imageId"`
	Bytes   int64         `json:"bytes"`
}

// ErrorResponse is the body of every non-2xx answer.
type ErrorResponse struct {
	Error string `json:"error"`
}

// LoadToken reads a token file: one line, at least 16 characters.
func LoadToken(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read token file: %w", err)
	}
	t := strings.TrimSpace(string(b))
	if len(t) < 16 {
		return nil, fmt.Errorf("token file %s: the token must be at least 16 characters (e.g. 'openssl rand -hex 32 > %s')", path, path)
	}
	return []byte(t), nil
}

// tokenEqual compares in constant time (over SHA-256 sums, so the length leaks nothing).
func tokenEqual(a, b []byte) bool {
	x, y := sha256.Sum256(a), sha256.Sum256(b)
	return subtle.ConstantTimeCompare(x[:], y[:]) == 1
}

// TLSFiles name the PEM files of mutual TLS; all empty means plain TCP.
type TLSFiles struct {
	Cert, Key, CA string
}

func (f TLSFiles) enabled() bool { return f.Cert != "" || f.Key != "" || f.CA != "" }

// config builds a TLS config that presents Cert/Key and requires the peer to present a
// certificate signed by CA (server: client certificates required; client: server verified).
func (f TLSFiles) config(server bool) (*tls.Config, error) {
	if f.Cert == "" || f.Key == "" || f.CA == "" {
		return nil, errors.New("mutual TLS needs all of --tls-cert, --tls-key and --tls-ca")
	}
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return nil, fmt.Errorf("load TLS key pair %s, %s: %w", f.Cert, f.Key, err)
	}
	pem, err := os.ReadFile(f.CA)
	if err != nil {
		return nil, fmt.Errorf("read TLS CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("TLS CA %s holds no PEM certificate", f.CA)
	}
	c := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13}
	if server {
		c.ClientCAs, c.ClientAuth = pool, tls.RequireAndVerifyClientCert
	} else {
		c.RootCAs = pool
	}
	return c, nil
}

// LocalFacts reads this host's facts: kernel release and architecture (uname), the CPU
// flags of the first processor (checkpoint.CPUFlags, as archives record them), and the CRIU
// version given.
func LocalFacts(criuVersion string) (HostFacts, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return HostFacts{}, fmt.Errorf("uname: %w", err)
	}
	flags := checkpoint.CPUFlags()
	if len(flags) == 0 {
		return HostFacts{}, errors.New("read CPU flags: /proc/cpuinfo has no flags line")
	}
	return HostFacts{CRIUVersion: criuVersion, Kernel: checkpoint.KernelRelease(),
		Arch: unix.ByteSliceToString(u.Machine[:]), CPUFlags: flags}, nil
}
