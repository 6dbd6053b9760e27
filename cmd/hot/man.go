package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
)

// newManCmd generates one man page per command (used by `make man`).
func newManCmd(root *cobra.Command) *cobra.Command {
	return &cobra.Command{
		Use:    "man DIR",
		Short:  "Write man pages for every hot command into DIR",
		Args:   cobra.ExactArgs(1),
		Hidden: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := os.MkdirAll(args[0], 0o755); err != nil {
				return fmt.Errorf("create man page dir: %w", err)
			}
			hdr := &doc.GenManHeader{Title: "HOT", Section: "8", Source: "hot"}
			if err := doc.GenManTree(root, hdr, args[0]); err != nil {
				return fmt.Errorf("generate man pages into %s: %w", args[0], err)
			}
			return nil
		},
	}
}
