package main

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hotctl/hot/cowfs"
	"github.com/spf13/cobra"
)

func newImageCmd(opts *globalOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "image",
		Short: "Import, list, inspect, export and remove images",
		Long: `Images live in hot's own content-addressed store under --root: blobs by sha256 digest,
layers unpacked once per diffID. Import OCI image layouts (directory or tar), docker-archive
tars, or a plain root filesystem.`,
	}
	cmd.AddCommand(
		newImageImportCmd(opts),
		newImageLsCmd(opts),
		newImageInspectCmd(opts),
		newImageRmCmd(opts),
		newImageExportCmd(opts),
	)
	return cmd
}

func newImageImportCmd(opts *globalOptions) *cobra.Command {
	var (
		tag                   string
		rootfs                string
		cmdArgs, entrypoint   []string
		env                   []string
		workdir               string
		asJSON                bool
		entrypointSet, cmdSet bool
	)
	cmd := &cobra.Command{
		Use:   "import [PATH] [--tag NAME:TAG] | --rootfs DIR|TAR [--cmd ...] [--tag NAME:TAG]",
		Short: "Import an image: OCI layout dir or tar, docker-archive tar, or a root filesystem",
		Long: `Import an image into the store. Every blob is verified against its digest; a mismatch,
a truncated or missing blob, or a layer entry that would escape its layer refuses the import
and leaves nothing behind.

  hot image import ./app.oci --tag app:v1          OCI layout directory
  hot image import app.tar --tag app:v1            OCI archive or docker-archive tar
  hot image import --rootfs ./rootfs --cmd /bin/sh --tag base:1   one-layer image from a directory or tar`,
		Args: func(cmd *cobra.Command, args []string) error {
			if rootfs != "" && len(args) > 0 {
				return usageError{fmt.Errorf("give either PATH or --rootfs, not both")}
			}
			if rootfs == "" && len(args) != 1 {
				return usageError{fmt.Errorf("want one PATH (OCI layout dir, OCI archive or docker-archive tar) or --rootfs DIR|TAR")}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			entrypointSet, cmdSet = cmd.Flags().Changed("entrypoint"), cmd.Flags().Changed("cmd")
			if tag != "" {
				if _, err := cowfs.NormalizeName(tag); err != nil {
					return usageError{fmt.Errorf("--tag: %w", err)}
				}
			}
			for _, e := range env {
				if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
					return usageError{fmt.Errorf("--env %q: want KEY=VALUE", e)}
				}
			}
			if workdir != "" && !strings.HasPrefix(workdir, "/") {
				return usageError{fmt.Errorf("--workdir %q: want an absolute path", workdir)}
			}
			defer endProgress(cmd.ErrOrStderr()) // clear the progress line before any message
			store, err := cowfs.Open(opts.root)
			if err != nil {
				return err
			}
			var imported []cowfs.Imported
			if rootfs != "" {
				ro := cowfs.RootfsOptions{Tag: tag, Env: env, WorkingDir: workdir, Progress: importProgress(cmd.ErrOrStderr())}
				if entrypointSet {
					ro.Entrypoint = entrypoint
				}
				if cmdSet {
					ro.Cmd = cmdArgs
				}
				im, err := store.ImportRootfs(cmd.Context(), rootfs, ro)
				if err != nil {
					return err
				}
				imported = append(imported, *im)
			} else {
				if entrypointSet || cmdSet || len(env) > 0 || workdir != "" {
					return usageError{fmt.Errorf("--cmd, --entrypoint, --env and --workdir only apply with --rootfs")}
				}
				imported, err = store.Import(cmd.Context(), args[0], cowfs.ImportOptions{Tag: tag, Progress: importProgress(cmd.ErrOrStderr())})
				if err != nil {
					return err
				}
			}
			endProgress(cmd.ErrOrStderr())
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), imported)
			}
			for _, im := range imported {
				name := strings.Join(im.Names, ", ")
				if name == "" {
					name = "<untagged>"
				}
				fmt.Fprintf(cmd.OutOrStdout(), "imported %s  id %s  manifest %s  (%d layers, %d new)\n",
					name, im.ID.Encoded(), im.ManifestDigest, im.Layers, im.NewLayers)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&tag, "tag", "", "name the imported image NAME:TAG (default tag: latest)")
	f.StringVar(&rootfs, "rootfs", "", "make a one-layer image from this root filesystem directory or tar (plain, gzip, zstd)")
	f.StringArrayVar(&cmdArgs, "cmd", nil, "with --rootfs: the image's default command; repeat for each argument")
	f.StringArrayVar(&entrypoint, "entrypoint", nil, "with --rootfs: the image's entrypoint; repeat for each argument")
	f.StringArrayVar(&env, "env", nil, "with --rootfs: KEY=VALUE environment entry; repeatable")
	f.StringVar(&workdir, "workdir", "", "with --rootfs: the image's working directory (absolute)")
	f.BoolVar(&asJSON, "json", false, "print the imported images as JSON")
	return cmd
}

func newImageLsCmd(opts *globalOptions) *cobra.Command {
	var asJSON, noTrunc bool
	cmd := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List images: name:tag, image ID (config digest), manifest digest, size, created",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			store, err := cowfs.Open(opts.root)
			if err != nil {
				return err
			}
			list, err := store.List(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), list)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tIMAGE ID\tMANIFEST DIGEST\tSIZE\tCREATED")
			for _, im := range list {
				id, md := im.ID.Encoded(), im.ManifestDigest.String()
				if !noTrunc {
					id, md = id[:12], md[:len("sha256:")+12]
				}
				created := "-"
				if im.Created != nil {
					created = im.Created.UTC().Format(time.RFC3339)
				}
				names := im.Names
				if len(names) == 0 {
					names = []string{"<untagged>"}
				}
				for _, n := range names {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", n, id, md, humanSize(im.Size), created)
				}
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON (full digests, holders)")
	cmd.Flags().BoolVar(&noTrunc, "no-trunc", false, "print full digests")
	return cmd
}

// imageInspect is what `hot image inspect --json` prints.
type imageInspect struct {
	Name           string              `json:"name,omitempty"`
	ManifestDigest string              `json:"manifestDigest"`
	ID             string              `json:"id"`
	Created        *time.Time          `json:"created,omitempty"`
	Architecture   string              `json:"architecture"`
	OS             string              `json:"os"`
	Entrypoint     []string            `json:"entrypoint"`
	Cmd            []string            `json:"cmd"`
	Env            []string            `json:"env"`
	WorkingDir     string              `json:"workingDir"`
	User           string              `json:"user,omitempty"`
	ExposedPorts   []string            `json:"exposedPorts"`
	Labels         map[string]string   `json:"labels,omitempty"`
	Layers         []imageInspectLayer `json:"layers"`
}

type imageInspectLayer struct {
	DiffID string `json:"diffID"`
	Dir    string `json:"dir"`
}

func newImageInspectCmd(opts *globalOptions) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "inspect NAME",
		Short: "Show an image's entrypoint, cmd, env, workdir, ports and layers",
		Args:  exactArgs(1, "NAME (name:tag, image ID or manifest digest)"),
		RunE: func(cmd *cobra.Command, args []string) error {
			store, err := cowfs.Open(opts.root)
			if err != nil {
				return err
			}
			img, err := store.Resolve(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			c := img.Config
			out := imageInspect{
				Name: img.Name, ManifestDigest: img.ManifestDigest.String(), ID: img.ID.String(),
				Created: c.Created, Architecture: c.Architecture, OS: c.OS,
				Entrypoint: nonNil(c.Config.Entrypoint), Cmd: nonNil(c.Config.Cmd), Env: nonNil(c.Config.Env),
				WorkingDir: c.Config.WorkingDir, User: c.Config.User, Labels: c.Config.Labels,
				ExposedPorts: []string{},
			}
			for p := range c.Config.ExposedPorts {
				out.ExposedPorts = append(out.ExposedPorts, p)
			}
			sort.Strings(out.ExposedPorts)
			for i, d := range c.RootFS.DiffIDs {
				out.Layers = append(out.Layers, imageInspectLayer{DiffID: d.String(), Dir: img.LayerDirs[i]})
			}
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), out)
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "Name:        %s\nImage ID:    %s\nManifest:    %s\n", orDash(out.Name), out.ID, out.ManifestDigest)
			if out.Created != nil {
				fmt.Fprintf(w, "Created:     %s\n", out.Created.UTC().Format(time.RFC3339))
			}
			fmt.Fprintf(w, "Platform:    %s/%s\n", orDash(out.OS), orDash(out.Architecture))
			fmt.Fprintf(w, "Entrypoint:  %s\nCmd:         %s\nWorkdir:     %s\n", quoteList(out.Entrypoint), quoteList(out.Cmd), orDash(out.WorkingDir))
			if out.User != "" {
				fmt.Fprintf(w, "User:        %s\n", out.User)
			}
			fmt.Fprintf(w, "Ports:       %s\n", orDash(strings.Join(out.ExposedPorts, " ")))
			fmt.Fprintln(w, "Env:")
			for _, e := range out.Env {
				fmt.Fprintf(w, "  %s\n", e)
			}
			fmt.Fprintln(w, "Layers (bottom first):")
			for _, l := range out.Layers {
				fmt.Fprintf(w, "  %s\n", l.DiffID)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print as JSON")
	return cmd
}

func newImageRmCmd(opts *globalOptions) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "rm NAME...",
		Aliases: []string{"remove"},
		Short:   "Remove images (refused while a container uses them)",
		Long: `Remove images. A name whose image has other names only loses that name; otherwise the
image is deleted with the blobs and unpacked layers no other image uses. An image a container
uses is refused, naming the containers.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return usageError{fmt.Errorf("want at least one NAME (name:tag, image ID or manifest digest)")}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			store, err := cowfs.Open(opts.root)
			if err != nil {
				return err
			}
			var all []*cowfs.Removed
			for _, ref := range args {
				r, err := store.Remove(cmd.Context(), ref)
				if err != nil {
					return err
				}
				all = append(all, r)
				if !asJSON {
					for _, n := range r.Untagged {
						fmt.Fprintf(cmd.OutOrStdout(), "untagged %s\n", n)
					}
					for _, d := range r.Deleted {
						fmt.Fprintf(cmd.OutOrStdout(), "deleted %s (%d blobs, %d layers freed)\n", d, r.Blobs, r.Layers)
					}
				}
			}
			if asJSON {
				return writeJSON(cmd.OutOrStdout(), all)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print what was removed as JSON")
	return cmd
}

func newImageExportCmd(opts *globalOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "export NAME FILE",
		Short: "Write an image as an OCI archive (re-import gives the same digests)",
		Args:  exactArgs(2, "NAME and FILE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			store, err := cowfs.Open(opts.root)
			if err != nil {
				return err
			}
			return store.ExportFile(cmd.Context(), args[0], args[1])
		},
	}
}

// importProgress shows the current import step on a self-rewriting line when w is a terminal.
func importProgress(w io.Writer) func(cowfs.ImportEvent) {
	if !isTerminal(w) {
		return nil
	}
	return func(e cowfs.ImportEvent) {
		line := e.Step + " " + e.What
		if e.Digest != "" {
			line += " " + e.Digest.String()[:len("sha256:")+12]
		}
		if e.Size >= 0 {
			line += " (" + humanSize(e.Size) + ")"
		}
		fmt.Fprintf(w, "\r\033[K%s", line)
	}
}

func exactArgs(n int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usageError{fmt.Errorf("%s: want %s (see '%s --help')", cmd.CommandPath(), what, cmd.CommandPath())}
		}
		return nil
	}
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func quoteList(s []string) string {
	if len(s) == 0 {
		return "-"
	}
	q := make([]string, len(s))
	for i, a := range s {
		q[i] = fmt.Sprintf("%q", a)
	}
	return "[" + strings.Join(q, ", ") + "]"
}

func humanSize(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
